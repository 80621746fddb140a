/* Private to csrc/: the structs behind the opaque types of diskpages.h. */
#ifndef DP_INTERNAL_H
#define DP_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "diskpages.h"

struct dp_page {
    struct dp_page *next; /* link in the release stack; written before the publishing CAS */
    dp_cache *cache;      /* a counted reference: the cache outlives its records */
    uint64_t id;
    uint64_t nbytes;
    /* Two owners: the hold (the Python object) and the removal. The record is freed when
     * both are done, so a release() racing the object's death never touches freed memory. */
    atomic_int refs;
    atomic_bool released;
    bool part; /* made as "<id>.part" (no O_TMPFILE here), renamed when whole */
    int fd;    /* a page being written in place: its open file, until sealed or dropped */
};

typedef struct dp_remover dp_remover;

/* Scratch for one drain (names, results, records): the drainer holds drain_lock, so one
 * buffer per cache serves, off every caller's stack (threads may have 32 KiB stacks). */
#define DRAIN_CHUNK 256
#define DP_NAME_MAX 32
struct dp_drain_scratch {
    char names[DRAIN_CHUNK][DP_NAME_MAX];
    char *ptrs[DRAIN_CHUNK];
    int results[DRAIN_CHUNK];
    dp_page *chunk[DRAIN_CHUNK];
};

struct dp_cache {
    /* Who keeps this memory: the hold of the Python PageCache, and every record. The last
     * one out frees it (dp_cache_put); the hold closes it before it lets go. */
    atomic_uint_fast64_t refs;
    int dirfd; /* -1 once close() has emptied the folder */
    pid_t owner; /* a forked child borrows the cache: it never removes, joins or drains */
    int sync;
    unsigned batch;
    uint64_t max_delay_ns;
    atomic_uint_fast64_t next_id;

    /* The release queue: a Treiber stack. Any thread pushes with one CAS; a drain takes the
     * whole stack with one exchange, so there is no pop and no ABA problem. */
    _Atomic(dp_page *) released;

    atomic_uint_fast64_t live_pages, live_bytes, pending, pending_bytes;
    atomic_uint_fast64_t removed, remove_errors, written;
    atomic_uint_fast64_t released_by[3]; /* enum release_cause */

    /* The budget: bytes of live, pending and being-written pages, never above max_bytes
     * (if not 0). Charged before a file is made, uncharged once it is removed. */
    uint64_t max_bytes;
    atomic_uint_fast64_t charged;

    /* Writers hold it shared, close holds it exclusive: no file is created after close
     * has emptied the folder. Never taken on the release path. */
    pthread_rwlock_t closing;
    atomic_bool closed;
    /* One close at a time: close() and the finalizer (at exit) may race, and the second
     * must not empty the folder while the first still waits for writers. */
    pthread_mutex_t close_lock;
    atomic_bool tmpfile; /* O_TMPFILE works in this folder (until it is refused once) */

    /* One user of the remover at a time (reaper, flush, close); the holder never needs
     * the GIL and never waits on anything that does. */
    pthread_mutex_t drain_lock;
    dp_remover *remover; /* NULL once closed */
    atomic_int remover_kind; /* what it is, for stats without the lock (a ring can fail) */
    struct dp_drain_scratch *scratch;

    /* The reaper sleeps on `wake` under `lock`; writes wake it when the first page appears
     * and close wakes it to stop. Releases never touch either: the reaper polls. */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    bool stop;
    bool kick; /* drain at once: a collection released pages */
    bool reaper_started;
    pthread_t reaper;
};

/* remove.c: unlink names relative to dirfd, overlapping the device waits where it can.
 * results[i] is 0 or -errno for names[i]. */
dp_remover *dp_remover_new(int mode);
void dp_remover_free(dp_remover *r);
int dp_remover_kind(const dp_remover *r);
void dp_remove_names(dp_remover *r, int dirfd, char *const *names, size_t count, int *results);
/* cache.c: remove every entry of a folder; the count removed or the first -errno */
int64_t dp_empty_dir(dp_remover *r, int dirfd);

enum release_cause { BY_REFCOUNT = 0, BY_GC = 1, BY_CALL = 2 };

/* hold.c: a call through a hold enters it (NULL: nothing held any more) and leaves it; a
 * finalizer drops it. Whoever finds the hold dropped and unused last (the dropper, or the
 * last call to leave) lets go of what it held, exactly once. */
void *dp_hold_enter(dp_hold *h, void (*let_go)(void *));
void dp_hold_leave(dp_hold *h, void (*let_go)(void *));
bool dp_hold_drop(dp_hold *h); /* true: letting go of h->ptr is the dropper's */
void dp_hold_empty(dp_hold *h);      /* what it held was handed on (a sealed builder) */
void dp_hold_mark_gc(dp_hold *h);    /* its page was reclaimed by the cycle collector */
bool dp_hold_marked_gc(dp_hold *h);

/* cache.c: the cache's counted references, and what its hold does on letting go (close,
 * then put the hold's reference) */
void dp_cache_get(dp_cache *c);
void dp_cache_put(dp_cache *c);
void dp_cache_let_go(void *c);
int dp_close_locked(dp_cache *c); /* the caller has entered the cache's hold */
/* queue.c: what a page's hold does on letting go (dp_drop_record) */
void dp_page_let_go(void *p);

/* queue.c */
int dp_charge(dp_cache *c, uint64_t nbytes); /* 0 or -DP_EFULL */
void dp_uncharge(dp_cache *c, uint64_t nbytes);
int64_t dp_drain_locked(dp_cache *c);
/* the hold lets go: release, close a builder's fd, put; true if the collector released it */
bool dp_drop_record(dp_page *p);
void dp_record_put(dp_page *p);
void *dp_reaper_main(void *arg);
void dp_wake_reaper(dp_cache *c);

uint64_t dp_now_ns(void);
pid_t dp_pid(void); /* getpid() without the system call; right in forked children */

void dp_part_name(uint64_t id, char *buf); /* "<id>.part": a page not yet whole */

#endif
