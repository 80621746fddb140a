/* Private to pack.c and trim.c: a segment's layout. A segment file is DP_TAGS_BYTES of
 * tags (32 bytes a slot, sparse until its slots exist), then its slots, each a whole
 * number of 4 KiB blocks; two bitmaps say which slots are taken and which hold blocks. */
#ifndef DP_SEGMENT_H
#define DP_SEGMENT_H

#include "internal.h"

#define KIB 1024ull
#define GROW_BYTES (1024 * KIB) /* a segment grows by at most this much (at least one slot) */
#define BLOCK 4096u             /* slots are multiples of it: a view maps a slot alone */
#define WORD_BITS 64u

static inline uint64_t slot_offset(const struct dp_segment *s, uint32_t slot)
{
    return DP_TAGS_BYTES + (uint64_t)slot * s->slot_size;
}

static inline bool bit(const uint64_t *map, uint32_t i)
{
    return map[i / WORD_BITS] >> (i % WORD_BITS) & 1;
}

static inline void set_bit(uint64_t *map, uint32_t i)
{
    map[i / WORD_BITS] |= 1ull << (i % WORD_BITS);
}

static inline void clear_bit(uint64_t *map, uint32_t i)
{
    map[i / WORD_BITS] &= ~(1ull << (i % WORD_BITS));
}

static inline uint32_t chunk_slots(const struct dp_segment *s)
{
    uint32_t most = GROW_BYTES > s->slot_size ? (uint32_t)(GROW_BYTES / s->slot_size) : 1;
    /* an eighth of itself, and at least 256 KiB: a new cache's first 4 KiB pages cost a
     * fallocate every 64 pages, not every few (200 pages into a new cache took 3.1 us a
     * page growing by an eighth alone, 2.1 us with this floor) */
    uint32_t grown = s->nslots / 8 + 1, least = (uint32_t)(256 * KIB / s->slot_size);
    if (grown < least)
        grown = least;
    return grown < most ? grown : most;
}

static inline uint64_t tags_end(uint32_t nslots)
{
    return ((uint64_t)nslots * sizeof(dp_tag) + BLOCK - 1) / BLOCK * BLOCK;
}

#endif
