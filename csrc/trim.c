/* The trim: the reaper gives back what a segment's freed slots hold on disk, off every
 * writer's path, in big pieces: it cuts a free tail with one ftruncate, and punches the
 * longest runs of freed slots that still hold blocks once they are more than the live
 * slots need. Under a budget it does so on every tick; otherwise once the room has been
 * spare for SPARE_NS, so a working set that comes back keeps its blocks. A range being cut
 * or punched is reserved (taken) meanwhile, so no writer gets a slot under it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include "internal.h"
#include "segment.h"

/* Not under a budget, room is given back once it has been spare this long: a working set
 * that comes back (bursts of pages, each batch dropped) keeps its blocks, where punching
 * them and allocating them again made bursts of 1,000 4 KiB pages 1.4x slower here. */
#define SPARE_NS 100000000ull
/* The punches of one tick stop after this long, and the rest wait for the next: a long
 * list of scattered runs (~150 us a punch on a disk mounted `discard`) kept the reaper from
 * removing released pages, and close() from stopping it, for seconds, and the reserved runs
 * made writers grow the segment past max_bytes meanwhile. */
#define PUNCH_NS 20000000ull

/* Give back the blocks of [off, off + len) of fd: 0 or -errno (a signal cannot cut it short). */
static int punch_hole(int fd, uint64_t off, uint64_t len)
{
    int err;
    do
        err = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) == 0 ? 0 : -errno;
    while (err == -EINTR);
    return err;
}

/* Lock held, and given up while the file shrinks: once two growth chunks or more past the
 * last taken slot are free, cut the segment back to a chunk boundary after it. One
 * ftruncate for the slots and one punch for their tags: the segment shrinks as the live
 * set does (its pages sit low: writers take the lowest free slot). The cut slots are
 * reserved (taken) meanwhile, so no writer gets one. (tail_keep: that boundary.) */
static uint32_t tail_keep(const struct dp_segment *s)
{
    uint32_t chunk = chunk_slots(s), top = s->nslots; /* one past the last taken slot */
    while (top > 0) {
        uint64_t word = s->taken[(top - 1) / WORD_BITS];
        uint32_t bits = (top - 1) % WORD_BITS + 1; /* bits of this word below top */
        word &= bits == WORD_BITS ? ~0ull : (1ull << bits) - 1;
        if (word) {
            top = (top - 1) / WORD_BITS * WORD_BITS + (WORD_BITS - (uint32_t)__builtin_clzll(word));
            break;
        }
        top -= bits;
    }
    /* a segment is rarely a whole number of chunks (it grows by an eighth of itself, or
     * by one slot on a full disk): a boundary past its end would grow it, not cut it */
    uint32_t keep = (top + chunk - 1) / chunk * chunk;
    return keep < s->nslots ? keep : s->nslots;
}

static void shrink_tail(struct dp_segment *s)
{
    uint32_t keep = tail_keep(s), had = s->nslots;
    if (had - keep < 2 * chunk_slots(s))
        return;
    for (uint32_t i = keep; i < had; i++)
        set_bit(s->taken, i);
    s->used += had - keep;
    s->cutting = true; /* nslots stays `had` until we are back, and nobody grows it meanwhile */
    int fd = s->fd;
    pthread_mutex_unlock(&s->lock);
    bool cut = ftruncate(fd, (off_t)slot_offset(s, keep)) == 0;
    if (cut && tags_end(had) > tags_end(keep)) /* the tags' blocks: segment_grow reserves */
        punch_hole(fd, tags_end(keep), tags_end(had) - tags_end(keep)); /* them again */
    pthread_mutex_lock(&s->lock);
    for (uint32_t i = keep; i < had; i++) {
        clear_bit(s->taken, i);
        if (cut && bit(s->hold_blocks, i)) {
            clear_bit(s->hold_blocks, i);
            s->backed--;
        }
    }
    s->used -= had - keep;
    s->cutting = false;
    if (cut)
        s->nslots = keep;
    else if (keep / WORD_BITS < s->hint)
        s->hint = keep / WORD_BITS;
}

struct run {
    uint32_t start, len;
};

static int longest_first(const void *a, const void *b)
{
    const struct run *x = a, *y = b;
    return x->len < y->len ? 1 : x->len > y->len ? -1 : 0;
}

/* Lock held, and given up while punching: once the free slots that hold blocks pass a
 * 32nd of the taken slots plus a growth chunk (a chunk alone under a budget), punch the
 * longest runs of them until half that slack is left (a quarter let a dask worker's spill
 * take 1.05-1.18x the disk of distributed's files at its peak). One punch per run, never
 * per slot, for PUNCH_NS a tick at most (punch_run). (Punches of one file
 * serialize on its inode lock, so io_uring would not overlap them; and ext4 writes a
 * dirty range back before it punches it, then waits for the TRIM on a disk mounted
 * `discard`: ~150 us a run here, so survivors scattered one in ten over 100,000 slots
 * take ~1.5 s to give back, where a contiguous drop takes one call.) */
static uint64_t slack_of(const struct dp_segment *s, bool budget)
{
    /* Under a budget the bytes on disk must follow the charged ones: no slack but a chunk. */
    return (budget ? 0 : s->used / 32) + chunk_slots(s);
}

/* Lock held, and given up during the punch: one run, reserved (taken) meanwhile so that
 * no writer gets a slot under the punch, and no more: writers reuse every other free slot.
 * Skipped if a writer took a slot of it since the runs were listed. */
static void punch_run(struct dp_segment *s, struct run run)
{
    for (uint32_t i = run.start; i < run.start + run.len; i++)
        if (!bit(s->hold_blocks, i) || bit(s->taken, i))
            return;
    for (uint32_t i = run.start; i < run.start + run.len; i++)
        set_bit(s->taken, i);
    s->used += run.len;
    int fd = s->fd;
    pthread_mutex_unlock(&s->lock);
    int err = punch_hole(fd, slot_offset(s, run.start), (uint64_t)run.len * s->slot_size);
    pthread_mutex_lock(&s->lock);
    for (uint32_t i = run.start; i < run.start + run.len; i++) {
        clear_bit(s->taken, i);
        if (!err) /* else the blocks stay; the slots are free all the same */
            clear_bit(s->hold_blocks, i);
    }
    s->used -= run.len;
    if (!err)
        s->backed -= run.len;
    if (run.start / WORD_BITS < s->hint)
        s->hint = run.start / WORD_BITS;
}

/* True if some of the runs it chose are left for the next tick (PUNCH_NS, or closing). */
static bool punch_runs(dp_cache *c, struct dp_segment *s, bool budget)
{
    uint64_t waste = s->backed - s->used, slack = slack_of(s, budget);
    if (waste <= slack)
        return false;
    uint64_t target = slack / 2;
    size_t cap = 1024, n = 0;
    struct run *runs = malloc(cap * sizeof *runs);
    for (uint32_t i = 0; runs && i < s->nslots;) {
        uint32_t w = i / WORD_BITS;
        if (i % WORD_BITS == 0 && (s->hold_blocks[w] & ~s->taken[w]) == 0) {
            i += WORD_BITS; /* nothing to punch in this word */
            continue;
        }
        if (!bit(s->hold_blocks, i) || bit(s->taken, i)) {
            i++;
            continue;
        }
        uint32_t start = i;
        while (i < s->nslots && bit(s->hold_blocks, i) && !bit(s->taken, i))
            i++;
        if (n == cap) {
            struct run *more = realloc(runs, 2 * cap * sizeof *runs);
            if (!more)
                break;
            runs = more;
            cap *= 2;
        }
        runs[n++] = (struct run){start, i - start};
    }
    if (!runs)
        return false;
    qsort(runs, n, sizeof *runs, longest_first);
    size_t chosen = 0;
    for (; chosen < n && waste > target; chosen++)
        waste -= runs[chosen].len;
    uint64_t until = dp_now_ns() + PUNCH_NS;
    size_t done = 0;
    for (; done < chosen; done++) {
        if (done && (dp_now_ns() >= until || __atomic_load_n(&c->stop, __ATOMIC_RELAXED)))
            break; /* the rest stay free, with their blocks, for the next tick */
        punch_run(s, runs[done]);
    }
    free(runs);
    return done < chosen;
}

/* The reaper's: give back what freed slots hold, off every writer's path; under a budget
 * at once, else once it has been spare for SPARE_NS. True if some waits for that. */
static bool trim_segment(dp_cache *c, struct dp_segment *s)
{
    bool later = false, budget = c->max_bytes != 0;
    pthread_mutex_lock(&s->lock);
    if (s->tags) {
        dp_release_deferred(c, s);
        bool tail = s->nslots - tail_keep(s) >= 2 * chunk_slots(s);
        if (!tail && s->backed - s->used <= slack_of(s, budget)) {
            s->spare_since = 0; /* used again: the clock starts over */
        } else {
            uint64_t t = dp_now_ns();
            if (!s->spare_since)
                s->spare_since = t;
            if (budget || t - s->spare_since >= SPARE_NS) {
                shrink_tail(s);
                if (punch_runs(c, s, budget))
                    later = true; /* spare_since stays: the next tick goes on at once */
                else
                    s->spare_since = 0;
            } else {
                later = true;
            }
        }
    }
    pthread_mutex_unlock(&s->lock);
    return later;
}

bool dp_trim(dp_cache *c)
{
    bool later = false;
    for (int i = 0; i < DP_CLASSES; i++)
        /* set once, under the lock, by the class's first writer */
        if (__atomic_load_n(&c->segs[i].fd, __ATOMIC_ACQUIRE) >= 0)
            later |= trim_segment(c, &c->segs[i]);
    return later;
}
