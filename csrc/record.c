/* Records and their accounting: a page's record, its file's names, the budget's charge,
 * and the counted references that keep a cache's memory alive while any record does.
 *
 * Below segments, removal, the reaper and writes, which all use records: so it calls no
 * file above it. Where a record's last reference must close or free its cache, it calls
 * back through the cache's close_locked and free_cache (set by cache.c at open). */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>

#include "internal.h"

void dp_page_name(uint64_t id, char *buf)
{
    snprintf(buf, DP_NAME_MAX, "%llu.page", (unsigned long long)id);
}

void dp_part_name(uint64_t id, char *buf)
{
    snprintf(buf, DP_NAME_MAX, "%llu.part", (unsigned long long)id);
}

int dp_charge(dp_cache *c, uint64_t nbytes)
{
    if (c->max_bytes == 0) {
        atomic_fetch_add_explicit(&c->charged, nbytes, memory_order_relaxed);
        return 0;
    }
    uint64_t now = atomic_load_explicit(&c->charged, memory_order_relaxed);
    do {
        if (nbytes > c->max_bytes || now > c->max_bytes - nbytes)
            return -DP_EFULL;
    } while (!atomic_compare_exchange_weak_explicit(&c->charged, &now, now + nbytes,
                                                    memory_order_acquire,
                                                    memory_order_relaxed));
    return 0;
}

void dp_uncharge(dp_cache *c, uint64_t nbytes)
{
    atomic_fetch_sub_explicit(&c->charged, nbytes, memory_order_release);
}

void dp_cache_get(dp_cache *c)
{
    atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
}

void dp_cache_put(dp_cache *c)
{
    /* acq_rel: whoever frees sees every write the other owners made. */
    if (atomic_fetch_sub_explicit(&c->refs, 1, memory_order_acq_rel) == 1)
        c->free_cache(c); /* cache.c's, set at open: the top layer frees what it made */
}

void dp_cache_let_go(void *ptr)
{
    dp_cache *c = ptr;
    /* cache.c's dp_close_locked; errors: close() reports them, a finalizer has no one to tell */
    c->close_locked(c);
    dp_cache_put(c);
}

void dp_record_share(dp_page *p, uint64_t dev, uint64_t ino)
{
    if (!atomic_load(&p->shared)) { /* set once: a drain may read them from then on */
        p->dev = dev;
        p->ino = ino;
    }
    atomic_store_explicit(&p->shared, true, memory_order_release);
}

void dp_record_put(dp_page *p)
{
    /* acq_rel: the last owner must see every write the other owner made before freeing. */
    if (atomic_fetch_sub_explicit(&p->refs, 1, memory_order_acq_rel) == 1) {
        dp_cache *c = p->cache;
        free(p);
        dp_cache_put(c); /* the record's reference: the cache may go with its last record */
    }
}

void dp_count_add(struct dp_count *n, const dp_page *p)
{
    /* seq_cst: the reaper's sleep and dp_counts rely on the order of the three families
     * (a page is written before it is released, released before it is drained) */
    atomic_fetch_add(&n->pages, 1);
    atomic_fetch_add(&n->bytes, p->nbytes);
    atomic_fetch_add(&n->disk, p->charge);
}

void dp_counts(dp_cache *c, struct dp_counts *out)
{
    /* Each family loaded after the one it follows: drained <= released <= written held
     * at every instant, and each load is later, so no difference below is negative. */
    struct dp_count *d = &c->counts.drained, *r = &c->counts.released, *w = &c->counts.written;
    uint64_t dp = atomic_load(&d->pages), db = atomic_load(&d->bytes), dd = atomic_load(&d->disk);
    uint64_t rp = atomic_load(&r->pages), rb = atomic_load(&r->bytes), rd = atomic_load(&r->disk);
    uint64_t wp = atomic_load(&w->pages), wb = atomic_load(&w->bytes), wd = atomic_load(&w->disk);
    *out = (struct dp_counts){
        .live = wp - rp, .live_bytes = wb - rb, .live_disk = wd - rd,
        .pending = rp - dp, .pending_bytes = rb - db, .pending_disk = rd - dd,
    };
}
