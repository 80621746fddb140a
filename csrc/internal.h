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
    dp_cache *cache;
    uint64_t id;
    uint64_t nbytes;
    /* Two owners: the Python object and the removal. The record is freed when both are done,
     * so a release() racing the object's death never touches freed memory. */
    atomic_int refs;
    atomic_bool released;
    bool part; /* made as "<id>.part" (no O_TMPFILE here), renamed when whole */
};

typedef struct dp_remover dp_remover;

struct dp_cache {
    int dirfd;
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
    atomic_bool tmpfile; /* O_TMPFILE works in this folder (until it is refused once) */

    /* One user of the remover at a time (reaper, flush, close); the holder never needs
     * the GIL and never waits on anything that does. */
    pthread_mutex_t drain_lock;
    dp_remover *remover;

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

/* queue.c */
int dp_charge(dp_cache *c, uint64_t nbytes); /* 0 or -DP_EFULL */
void dp_uncharge(dp_cache *c, uint64_t nbytes);
int64_t dp_drain_locked(dp_cache *c);
void dp_free_queue(dp_cache *c);
void *dp_reaper_main(void *arg);
void dp_wake_reaper(dp_cache *c);

uint64_t dp_now_ns(void);
pid_t dp_pid(void); /* getpid() without the system call; right in forked children */

#define DP_NAME_MAX 32
void dp_part_name(uint64_t id, char *buf); /* "<id>.part": a page not yet whole */

#endif
