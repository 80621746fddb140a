/* The release queue and the reaper: how a dropped page becomes a removed file.
 *
 * Release is one CAS on a Treiber stack plus a few atomic counters: no lock, no system
 * call, no allocation (the record was allocated when the page was written). A drain takes
 * the whole stack with one exchange and removes the files in chunks through the remover.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define MIN_TICK_NS 1000000ull  /* 1 ms: the reaper never polls faster than this */
#define VIEWED_POLL_NS 100000000ull /* 100 ms: how often the reaper reads /proc/locks */
#define MAX_TICK_NS 10000000ull /* 10 ms: how late a full batch may be noticed */

/* Set by the gc callback around each collection: the thread that runs it, named by the
 * address of its `me`. A page dropped in that thread meanwhile was freed by the collector
 * (finalizers run in the collecting thread); one dropped in another thread, which runs
 * whenever a C call of the collection lets go of the GIL, was freed by refcount.
 *
 * One mark naming one thread, not a flag per thread: an interrupt (a signal handler that
 * raises) can land on the callback's first instruction, before it calls dp_gc_phase, and
 * skip the end of a collection. The mark then stays on this thread only until the next
 * collection starts, in any thread, and takes it over: nothing else is left stale. */
static _Atomic(const char *) collector;
static _Thread_local char me;
static atomic_uint_fast64_t gc_releases;

void dp_gc_phase(int on)
{
    atomic_store_explicit(&collector, on ? &me : NULL, memory_order_relaxed);
}

int dp_gc_collecting(void)
{
    return atomic_load_explicit(&collector, memory_order_relaxed) != NULL;
}

int dp_gc_collecting_here(void)
{
    /* &me only while some thread collects: a thread-local's address costs a call in a
     * shared library, and every drop asks */
    const char *who = atomic_load_explicit(&collector, memory_order_relaxed);
    return who != NULL && who == &me;
}

uint64_t dp_gc_take_releases(void)
{
    return atomic_exchange_explicit(&gc_releases, 0, memory_order_relaxed);
}

/* Records released after close are nobody's to drain: take back their removal's share
 * (close empties the whole folder, so their files go with it). */
static void reclaim_after_close(dp_cache *c)
{
    for (int q = 0; q < 2; q++) {
        dp_page *p = atomic_exchange(q ? &c->released_slots : &c->released, NULL);
        while (p) {
            dp_page *next = p->next;
            dp_count_add(&c->counts.drained, p);
            dp_record_put(p);
            p = next;
        }
    }
}

/* Returns whether this call released it (false: it was released already). */
static bool release_page(dp_page *p, int cause)
{
    if (atomic_exchange_explicit(&p->released, true, memory_order_acq_rel))
        return false;
    dp_cache *c = p->cache;
    /* Pending from here: the reaper, if it looks for live and pending pages now, sees this
     * one as one or the other (dp_count_add, dp_counts). Its cause after: see released_by.
     * After close, it counts as released at close (dp_cache_stats works it out). */
    dp_count_add(&c->counts.released, p);
    if (atomic_load_explicit(&c->closed, memory_order_relaxed)) {
        atomic_fetch_add(&c->released_after_close, 1);
    } else if (cause != BY_REFCOUNT) { /* by refcount, the common case: the rest */
        atomic_fetch_add_explicit(&c->released_by[cause], 1, memory_order_release);
        if (cause == BY_GC)
            atomic_fetch_add_explicit(&gc_releases, 1, memory_order_relaxed);
    }
    _Atomic(dp_page *) *queue = p->cls >= 0 ? &c->released_slots : &c->released;
    dp_page *head = atomic_load_explicit(queue, memory_order_relaxed);
    do {
        p->next = head;
        /* seq_cst (a locked instruction either way on x86): with close's store of `closed`
         * before its drain, either that drain takes this node or the load below sees
         * closed, so no node is left in a queue that nobody drains any more. Release
         * alone would also do for the drain that takes it: it sees id, size and link. */
    } while (!atomic_compare_exchange_weak(queue, &head, p));
    if (atomic_load(&c->closed))
        reclaim_after_close(c);
    return true;
}

bool dp_drop_record(dp_page *p)
{
    bool by_gc = dp_gc_collecting_here();
    bool released = release_page(p, by_gc ? BY_GC : BY_REFCOUNT);
    if (p->fd >= 0) { /* a builder never sealed: its file goes with its last fd */
        close(p->fd);
        p->fd = -1;
    }
    dp_record_put(p);
    return by_gc && released;
}

void dp_page_let_go(void *p)
{
    dp_drop_record(p);
}

void dp_page_release(dp_hold *h)
{
    dp_page *p = dp_hold_enter(h, dp_page_let_go);
    if (!p)
        return;
    release_page(p, BY_CALL);
    dp_hold_leave(h, dp_page_let_go);
}

int dp_page_released(dp_hold *h)
{
    dp_page *p = dp_hold_enter(h, dp_page_let_go);
    if (!p)
        return 1;
    int released = atomic_load_explicit(&p->released, memory_order_acquire) ||
                   atomic_load(&p->cache->closed);
    dp_hold_leave(h, dp_page_let_go);
    return released;
}

void dp_page_drop(dp_hold *h)
{
    if (!dp_hold_drop(h))
        return; /* dropped before, or a call inside lets go when it leaves */
    dp_page *p = h->ptr;
    bool closed = atomic_load(&p->cache->closed); /* read while the record is ours */
    if (dp_drop_record(p) && !closed)
        dp_hold_mark_gc(h); /* for a warn_on_gc page's __del__, which may run before or after */
}

int dp_page_reclaimed_by_gc(dp_hold *h)
{
    if (dp_hold_marked_gc(h))
        return 1;
    if (!dp_gc_collecting_here())
        return 0;
    return !dp_page_released(h);
}

int dp_builder_fd(dp_hold *h)
{
    dp_page *p = dp_hold_enter(h, dp_page_let_go);
    if (!p)
        return -DP_ERELEASED;
    int fd = p->fd >= 0 ? p->fd : -DP_ERELEASED;
    dp_hold_leave(h, dp_page_let_go);
    return fd;
}

/* The files that OFD read locks are on, from /proc/locks (proc(5)), sorted: a borrower's
 * view holds one on its page's file for as long as the view's mapping lives
 * (dp_borrow_view). Read only when a pickled page's file goes, or while one removed is
 * still viewed (at most every VIEWED_POLL_NS on the reaper's ticks): a file that is not
 * open here needs no fd of ours to be looked up, so removal opens nothing. n = 0: none, or
 * /proc is not there (then views are not seen). */
struct locked_file {
    uint64_t dev, ino;
};
struct locks {
    size_t n;
    struct locked_file *files;
};

static int by_file(const void *a, const void *b)
{
    const struct locked_file *x = a, *y = b;
    if (x->dev != y->dev)
        return x->dev < y->dev ? -1 : 1;
    return x->ino < y->ino ? -1 : x->ino > y->ino;
}

static char *read_all(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    while (buf) {
        ssize_t n = read(fd, buf + len, cap - len - 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += (size_t)n;
        if (len + 1 == cap) {
            char *more = realloc(buf, cap *= 2);
            if (!more)
                free(buf);
            buf = more;
        }
    }
    close(fd);
    if (buf)
        buf[len] = '\0';
    return buf;
}

/* A line reads "<n>: OFDLCK ADVISORY READ -1 <major>:<minor>:<inode> <start> <end>" (major
 * and minor in hex, as the kernel prints the file system's device); other kinds of lock
 * are skipped before they are parsed. */
static struct locks read_locks(void)
{
    struct locks out = {0, NULL};
    char *text = read_all("/proc/locks");
    size_t cap = 0;
    for (char *line = text; line && *line;) {
        char *end = strchr(line, '\n');
        if (end)
            *end = '\0';
        char *kind = strstr(line, "OFDLCK");
        unsigned major, minor;
        unsigned long long inode;
        if (kind && strstr(kind, " READ ") &&
            sscanf(kind, "OFDLCK %*s READ %*s %x:%x:%llu", &major, &minor, &inode) == 3) {
            if (out.n == cap) {
                cap = cap ? 2 * cap : 64;
                struct locked_file *more = realloc(out.files, cap * sizeof *more);
                if (!more)
                    break;
                out.files = more;
            }
            out.files[out.n++] = (struct locked_file){makedev(major, minor), inode};
        }
        line = end ? end + 1 : NULL;
    }
    free(text);
    if (out.n)
        qsort(out.files, out.n, sizeof *out.files, by_file);
    return out;
}

/* Whether an OFD read lock is on the file dev:ino. */
static bool viewed_by_borrower(const struct locks *locks, uint64_t dev, uint64_t ino)
{
    struct locked_file key = {dev, ino};
    return locks->n && bsearch(&key, locks->files, locks->n, sizeof key, by_file) != NULL;
}

/* A removed file that a borrower maps: kept in `viewed`, with a pin of its own, until the
 * borrower's last view goes. False if it cannot be kept (no memory: then it is not
 * counted, as before this was). */
static bool keep_viewed(dp_cache *c, dp_page *p)
{
    if (c->nviewed == c->viewed_cap) {
        size_t cap = c->viewed_cap ? 2 * c->viewed_cap : 16;
        dp_page **more = realloc(c->viewed, cap * sizeof *more);
        if (!more)
            return false;
        c->viewed = more;
        c->viewed_cap = cap;
    }
    atomic_fetch_add(&p->pins, 1); /* above 0 still: the page's own pin is not yet dropped */
    c->viewed[c->nviewed++] = p;
    return true;
}

void dp_poll_viewed(dp_cache *c, bool all)
{
    if (c->nviewed == 0)
        return;
    struct locks locks = {0, NULL};
    if (!all)
        locks = read_locks();
    atomic_store_explicit(&c->viewed_polled_ns, dp_now_ns(), memory_order_relaxed);
    for (size_t i = 0; i < c->nviewed;) {
        dp_page *p = c->viewed[i];
        if (viewed_by_borrower(&locks, p->dev, p->ino)) {
            i++;
            continue;
        }
        c->viewed[i] = c->viewed[--c->nviewed];
        dp_unpin(p, false); /* the view's pin: its bytes are free (uncharged) now */
        dp_record_put(p);
    }
    free(locks.files);
}

/* Remove one chunk of records' files and retire the records; returns how many files
 * went (or were gone already). */
static int64_t remove_chunk(dp_cache *c, dp_page **recs, size_t n)
{
    struct dp_drain_scratch *s = c->scratch;
    int64_t removed = 0;
    for (size_t i = 0; i < n; i++) {
        /* an unsealed builder's file, where there is no O_TMPFILE, has its .part name */
        (recs[i]->part ? dp_part_name : dp_page_name)(recs[i]->id, s->names[i]);
        s->ptrs[i] = s->names[i];
        /* A view of a file with another name (a page adopted from this one, a handed name)
         * holds nothing this removal frees: that name's owner counts it. */
        struct stat st;
        s->last_name[i] = atomic_load_explicit(&recs[i]->shared, memory_order_acquire) &&
                          fstatat(c->dirfd, s->names[i], &st, AT_SYMLINK_NOFOLLOW) == 0 &&
                          st.st_nlink == 1;
    }
    dp_remove_names(c->remover, c->dirfd, s->ptrs, n, s->results);
    /* A pickled page's file may be mapped by a borrower: now that its name is gone, look
     * for the borrower's lock (dp_borrow_view says why in this order). */
    struct locks locks = {0, NULL};
    for (size_t i = 0; i < n; i++)
        if (s->last_name[i] && s->results[i] == 0) {
            locks = read_locks();
            break;
        }
    atomic_store_explicit(&c->remover_kind, dp_remover_kind(c->remover), memory_order_relaxed);
    for (size_t i = 0; i < n; i++) {
        /* ENOENT: someone removed it under us; the file is gone either way. */
        /* Out of pending before the room is given back (the uncharge is a release, the
         * charge that takes the room an acquire): a writer that reuses these bytes
         * publishes its page only after they have left pending, so live + pending never
         * passes charged, nor charged max_bytes. */
        dp_count_add(&c->counts.drained, recs[i]);
        if (s->results[i] == 0 || s->results[i] == -ENOENT) {
            removed++;
            atomic_fetch_add(&c->removed, 1);
            if (s->last_name[i] && viewed_by_borrower(&locks, recs[i]->dev, recs[i]->ino) &&
                keep_viewed(c, recs[i])) {
                dp_unpin(recs[i], true); /* pinned now: the borrower's view holds a pin */
                continue; /* the removal's reference goes with the view (dp_poll_viewed) */
            }
            dp_unpin(recs[i], true); /* its name is gone: room again, unless a view holds it */
        } else {
            atomic_fetch_add(&c->remove_errors, 1); /* its bytes stay charged until close */
        }
        dp_record_put(recs[i]); /* never the cache's last reference: its hold has one */
    }
    free(locks.files);
    return removed;
}

/* Remove everything queued; returns how many files went (a failed removal is counted in
 * remove_errors instead). The caller holds drain_lock: the remover's ring has one
 * producer, so the reaper, flush() and close() take turns. */
int64_t dp_drain_locked(dp_cache *c)
{
    dp_poll_viewed(c, false);
    int64_t slots = dp_drain_slots(c); /* no system call: first */
    /* seq_cst, like the pushes: it pairs with each push we take (we see its id, size and
     * link), and with close's store of `closed` (see release_page). */
    dp_page *list = atomic_exchange(&c->released, NULL);
    int64_t count = 0;
    dp_page **chunk = c->scratch->chunk;
    size_t n = 0;
    for (dp_page *p = list; p != NULL;) {
        dp_page *next = p->next; /* read before remove_chunk may free p */
        chunk[n++] = p;
        if (n == DRAIN_CHUNK) {
            count += remove_chunk(c, chunk, n);
            n = 0;
        }
        p = next;
    }
    if (n)
        count += remove_chunk(c, chunk, n);
    return slots + count;
}

int64_t dp_flush(dp_hold *h)
{
    dp_cache *c = dp_hold_enter(h, dp_cache_let_go);
    if (!c)
        return 0;
    int64_t count = 0;
    /* not in a forked child: drain_lock may be held by a thread that did not fork */
    if (dp_pid() == c->owner) {
        pthread_mutex_lock(&c->drain_lock);
        /* checked under the lock: once close() has taken it, no flush touches the folder */
        count = atomic_load(&c->closed) ? 0 : dp_drain_locked(c);
        pthread_mutex_unlock(&c->drain_lock);
    }
    dp_hold_leave(h, dp_cache_let_go);
    return count;
}

void dp_kick(dp_hold *h)
{
    dp_cache *c = dp_hold_enter(h, dp_cache_let_go);
    if (!c)
        return;
    /* not in a forked child: it has no reaper, and the lock may be held by a lost thread */
    if (dp_pid() == c->owner && !atomic_load(&c->closed)) {
        pthread_mutex_lock(&c->lock);
        c->kick = true;
        pthread_cond_signal(&c->wake);
        pthread_mutex_unlock(&c->lock);
    }
    dp_hold_leave(h, dp_cache_let_go);
}

void dp_wake_reaper(dp_cache *c)
{
    pthread_mutex_lock(&c->lock);
    pthread_cond_signal(&c->wake);
    pthread_mutex_unlock(&c->lock);
}

static void deadline_after(uint64_t ns, struct timespec *ts)
{
    uint64_t t = dp_now_ns() + ns;
    ts->tv_sec = (time_t)(t / 1000000000ull);
    ts->tv_nsec = (long)(t % 1000000000ull);
}

/* The reaper polls: releases cannot wake it without a system call, and they must not make
 * one. While pages are live or pending it ticks every max_delay/4, but at least every 10 ms
 * so that a full batch is noticed soon (an idle wakeup costs a few microseconds); with no
 * page live it sleeps until a write wakes it. A page released at time t is removed by
 * t + max_delay (plus scheduling and removal time): the reaper drains once the oldest
 * possible waiter would reach max_delay by the next tick, or once `batch` are waiting. */
void *dp_reaper_main(void *arg)
{
    dp_cache *c = arg;
    uint64_t tick = c->max_delay_ns / 4;
    if (tick > MAX_TICK_NS)
        tick = MAX_TICK_NS;
    if (tick < MIN_TICK_NS)
        tick = MIN_TICK_NS;
    uint64_t last_empty = dp_now_ns();
    bool trim_later = false; /* freed slots wait to be given back (dp_trim) */
    me = 0; /* this thread's TLS block exists from here on (see dp_cache_open) */

    pthread_mutex_lock(&c->lock);
    c->reaper_running = true;
    pthread_cond_broadcast(&c->wake);
    while (!c->stop) {
        if (c->kick) {
            c->kick = false;
            pthread_mutex_unlock(&c->lock);
            pthread_mutex_lock(&c->drain_lock);
            dp_drain_locked(c);
            pthread_mutex_unlock(&c->drain_lock);
            pthread_mutex_lock(&c->lock);
            last_empty = dp_now_ns();
            continue;
        }
        /* A page released after the counts were loaded was live when they were: no page
         * slips past them unseen (dp_counts). */
        struct dp_counts n;
        dp_counts(c, &n);
        /* Views of removed pages, and slots kept for forked children, free their slots when
         * they go, with no call to wake us: keep ticking, so the trim sees them. */
        bool waiting = atomic_load(&c->pinned) || atomic_load(&c->deferred) || trim_later;
        if (n.live == 0 && n.pending == 0 && !waiting) {
            pthread_mutex_unlock(&c->lock);
            /* nothing live: give back what the freed slots hold, then sleep (or tick until
             * it has been spare long enough to give back: dp_trim) */
            trim_later = dp_trim(c);
            pthread_mutex_lock(&c->lock);
            if (trim_later)
                continue;
            atomic_store(&c->idle, true); /* before the last look: see dp_cache.idle */
            dp_counts(c, &n);
            bool sleep = !(c->stop || c->kick || n.live || n.pending);
            if (sleep)
                pthread_cond_wait(&c->wake, &c->lock);
            atomic_store(&c->idle, false);
            if (sleep)
                last_empty = dp_now_ns();
            continue;
        }
        pthread_mutex_unlock(&c->lock);
        trim_later = dp_trim(c); /* cheap unless freed slots hold far more blocks than needed */
        /* some pinned pages may be files that borrowers' views hold: look again, now and
         * then (reading /proc/locks costs what the system's locks number) */
        uint64_t polled = atomic_load_explicit(&c->viewed_polled_ns, memory_order_relaxed);
        if (atomic_load(&c->pinned) && dp_now_ns() - polled >= VIEWED_POLL_NS) {
            pthread_mutex_lock(&c->drain_lock);
            dp_poll_viewed(c, false);
            pthread_mutex_unlock(&c->drain_lock);
        }
        pthread_mutex_lock(&c->lock);
        if (c->stop || c->kick)
            continue;
        struct timespec deadline;
        deadline_after(tick, &deadline);
        pthread_cond_timedwait(&c->wake, &c->lock, &deadline);
        if (c->stop || c->kick)
            continue;
        uint64_t now = dp_now_ns();
        dp_counts(c, &n);
        uint64_t pending = n.pending;
        if (pending == 0) {
            last_empty = now; /* anything released from here on is newer than `now` */
            continue;
        }
        if (pending >= c->batch || now - last_empty + tick >= c->max_delay_ns) {
            pthread_mutex_unlock(&c->lock);
            pthread_mutex_lock(&c->drain_lock);
            dp_drain_locked(c);
            pthread_mutex_unlock(&c->drain_lock);
            pthread_mutex_lock(&c->lock);
            last_empty = now;
        }
    }
    pthread_mutex_unlock(&c->lock);
    return NULL;
}
