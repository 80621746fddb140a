/* Private to csrc/: the structs behind the opaque types of diskpages.h. */
#ifndef DP_INTERNAL_H
#define DP_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "diskpages.h"

struct dp_page {
    struct dp_page *next; /* link in the release stack; written before the publishing CAS */
    dp_cache *cache;      /* a counted reference: the cache outlives its records */
    uint64_t id;
    uint64_t nbytes;
    uint64_t charge; /* what it takes on disk, and is charged: its slot, or its file's blocks */
    /* Two owners: the hold (the Python object) and the removal. The record is freed when
     * both are done, so a release() racing the object's death never touches freed memory. */
    atomic_int refs;
    atomic_bool released;
    /* pickled (dp_page_share): a borrower may map its file, so its removal looks for one;
     * dev and ino name the file then (set before `shared`, read after it) */
    atomic_bool shared;
    uint64_t dev, ino;
    bool part; /* made as "<id>.part" (no O_TMPFILE here), renamed when whole */
    int fd;    /* a page being written in place: its open file, until sealed or dropped */
    /* What keeps the page's bytes on disk (and charged): 1 for the page itself until it is
     * removed, plus one per pin (a read under way, a view). Whoever takes it to 0 frees
     * the bytes: uncharges them, and gives a slot back. A pin is taken only while it is
     * above 0, so bytes once freed are never read again through this record. */
    atomic_uint pins;
    int cls;       /* its segment's size class if packed, else -1 (a file of its own) */
    uint32_t slot; /* its slot in that segment */
};

/* A pin (dp_page_pin): a record's bytes held for a reader, and the fd it reads them by. */
typedef struct dp_pin {
    dp_page *rec;
    int fd;
    uint64_t offset;
    /* A pin whose view maps a slot is registered (slotview.c), so that a fork can protect the
     * child's copy of the view: see dp_register_view. */
    struct dp_pin *prev, *next;
    void *addr;
    size_t len;
    bool registered;
} dp_pin;

/* pack.c: one segment file per size class, made at the first page of that class. Its lock
 * guards the bitmaps and the file's growth; writers, the drain and the trim take it
 * briefly, never around a write of page bytes, and never on the release path. */
#define DP_CLASSES 80
struct dp_segment {
    pthread_mutex_t lock;
    uint64_t slot_size;
    int fd;           /* -1 until the first page of the class, and again after close */
    dp_tag *tags;     /* a shared mapping of the segment's tags (DP_TAGS_BYTES) */
    uint32_t nslots;  /* slots the file has room for: it grows in chunks */
    uint32_t used;    /* slots taken (by pages, or reserved by the trim) */
    uint32_t backed;  /* slots that hold blocks on disk (written since the last punch) */
    uint32_t hint;    /* no free slot below 64 * hint */
    bool cutting;     /* the trim is cutting the tail (unlocked): the segment must not grow */
    uint64_t spare_since; /* when the trim first found room to give back (0: none now) */
    uint64_t *taken;  /* DP_MAX_SLOTS bits each */
    uint64_t *hold_blocks;
    /* freed slots that forked children may still see through inherited views (their tag's
     * viewers): the trim frees them once no child does */
    uint32_t *deferred;
    size_t ndeferred, deferred_cap;
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
    bool last_name[DRAIN_CHUNK]; /* a shared page's name was its file's last (nlink 1) */
    dp_page *chunk[DRAIN_CHUNK];
};

/* A count of pages and their bytes (nbytes, and charge: what they take on disk). */
struct dp_count {
    atomic_uint_fast64_t pages, bytes, disk;
};

struct dp_cache {
    /* Who keeps this memory: the hold of the Python PageCache, and every record. The last
     * one out frees it (dp_cache_put); the hold closes it before it lets go. */
    atomic_uint_fast64_t refs;
    /* cache.c's, set at open, for record.c to call back: what the hold does on letting go
     * (dp_close_locked, before it puts its reference), and what the last put does. */
    int (*close_locked)(dp_cache *c);
    void (*free_cache)(dp_cache *c);
    int dirfd; /* -1 once close() has emptied the folder */
    /* the root's fd and the folder's name in it, where dp_cache_create made the folder
     * (close removes it); -1 where dp_cache_open was given a folder */
    int rootfd;
    char name[DP_NAME_MAX];
    pid_t owner; /* a forked child borrows the cache: it never removes, joins or drains */
    int sync;
    unsigned batch;
    uint64_t max_delay_ns;
    atomic_uint_fast64_t next_id;

    /* The release queue: a Treiber stack. Any thread pushes with one CAS; a drain takes the
     * whole stack with one exchange, so there is no pop and no ABA problem. Packed pages
     * have a stack of their own: freeing a slot needs no system call, so writers that
     * want a slot drain it themselves. */
    _Atomic(dp_page *) released;
    _Atomic(dp_page *) released_slots;
    uint64_t pack_max; /* pages up to this size are packed (0: none) */
    struct dp_segment segs[DP_CLASSES];
    atomic_uint_fast64_t pinned, pinned_bytes;
    atomic_uint_fast64_t deferred; /* freed slots kept for forked children (pack.c) */

    /* Pages, their bytes and their charges, only ever added to: written when published,
     * released when released, drained when taken off a release queue (removed, failed,
     * or taken back after close). Live is written - released and pending released -
     * drained, so a release adds to three counters and takes from none. A reader loads
     * drained, then released, then written (dp_counts): each family is then at least the
     * one before it, and no page counts as both live and pending. */
    struct {
        struct dp_count written, released, drained;
    } counts;
    atomic_uint_fast64_t removed, remove_errors;
    /* Releases by the collector and by a call, before close (added after `released`, so a
     * reader that loads them first never finds more of them than releases); by refcount
     * is the rest, less those after close (released_after_close). */
    atomic_uint_fast64_t released_by[3]; /* enum release_cause; BY_REFCOUNT unused */
    atomic_uint_fast64_t released_after_close;

    /* The budget: what live, pending, pinned and being-written pages take on disk (each
     * page's charge: its whole slot, or its file's blocks, one at least), never above
     * max_bytes (if not 0). Charged before a file is made, uncharged once it is removed. */
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
    /* Removed page files that a borrower still maps (its open file description holds an
     * OFD read lock, which lives as long as a mapping of it): each record keeps a pin, so
     * its bytes stay pinned and charged, until the lock is gone (dp_poll_viewed). Under
     * drain_lock. */
    dp_page **viewed;
    size_t nviewed, viewed_cap;
    atomic_uint_fast64_t viewed_polled_ns; /* when dp_poll_viewed last looked */

    /* The reaper sleeps on `wake` under `lock`; writes wake it when the first page appears
     * and close wakes it to stop. Releases never touch either: the reaper polls. */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    bool stop;
    bool kick; /* drain at once: a collection released pages */
    bool reaper_started;
    bool reaper_running; /* set by the reaper once started: dp_cache_open waits for it */
    /* The reaper is about to sleep, or sleeps, with no timeout (nothing live or pending):
     * only then must a write wake it (dp_publish), so writing and dropping one page at a
     * time costs no wakeup. Stored before the reaper's last look at live_pages, loaded
     * after a write adds to it (both seq_cst): one of the two sees the other. */
    atomic_bool idle;
    pthread_t reaper;

    /* Names dp_hand_over made that may still be there (adopt unlinks them), under `lock`:
     * stats counts the ones that are, and forgets the others. */
    char **handed;
    size_t nhanded, handed_cap;
};

/* The call graph runs down this list, one layer to the next (tests/test_shape.py keeps
 * it so): each file calls only the files listed above it. A callback passed down (the
 * cache's close_locked and free_cache, a hold's let_go) is how a lower layer reaches a
 * higher one.
 *
 * clock.c: the clock, and getpid() without the system call; right in forked children */
uint64_t dp_now_ns(void);
pid_t dp_pid(void);

/* io.c: pwritev every part at `off`, resuming after short writes and EINTR; consumes iov
 * (advanced in place). 0 or -errno. */
int dp_pwritev_all(int fd, struct iovec *iov, size_t count, off_t off);
/* every byte from `offset`: 0, -errno, or -DP_ESIZE if the file is shorter */
int dp_pread_exactly(int fd, void *buf, size_t nbytes, uint64_t offset);
/* nbytes of src from `from` to fd from 0: copy_file_range, else through a buffer */
int dp_copy_file(int src, uint64_t from, int fd, size_t nbytes);

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

/* record.c: a record's counted references, its file's names, the budget's charge, and the
 * cache's counted references with what its hold does on letting go (close through
 * close_locked, then put the hold's reference) */
/* Its file may be mapped by a view that outlives the page, here or in another process (a
 * borrower's, an inherited one, a view of an adopted link): its removal looks for the
 * views' OFD locks (dp_borrow_view). dev:ino name the file. */
void dp_record_share(dp_page *p, uint64_t dev, uint64_t ino);
void dp_record_put(dp_page *p);
void dp_part_name(uint64_t id, char *buf); /* "<id>.part": a page not yet whole */
int dp_charge(dp_cache *c, uint64_t nbytes); /* 0 or -DP_EFULL */
void dp_uncharge(dp_cache *c, uint64_t nbytes);
void dp_cache_get(dp_cache *c);
void dp_cache_put(dp_cache *c);
void dp_cache_let_go(void *c);
/* Add one page (its nbytes and charge) to a count: a publish, a release or a drain. */
void dp_count_add(struct dp_count *n, const dp_page *p);
/* Live and pending pages, bytes and charges, from the counts loaded in order (drained,
 * released, written): never below 0, and no page in both. */
struct dp_counts {
    uint64_t live, live_bytes, live_disk, pending, pending_bytes, pending_disk;
};
void dp_counts(dp_cache *c, struct dp_counts *out);

/* slotview.c: views of slots, for fork: a registered view's slot is kept (tag viewers)
 * across a fork until the child has copied the view into private memory (pthread_atfork
 * handlers, installed once by dp_slot_views_init). */
void dp_slot_views_init(void);
void dp_register_view(dp_pin *pin);
void dp_unregister_view(dp_pin *pin);

/* pack.c: segments */
#define DP_SEGMENT_FULL (-20001) /* the class's segment has DP_MAX_SLOTS: use a file */
void dp_segments_init(dp_cache *c);
void dp_segments_close(dp_cache *c); /* after the folder is emptied: fds and mappings go */
void dp_segments_free(dp_cache *c);
int dp_class_of(const dp_cache *c, size_t nbytes); /* -1: not packed */
/* What a page of nbytes takes on disk, and is charged: its slot's whole size if `pack` and
 * it is small enough, else its file's blocks (whole 4 KiB blocks, at least one, for the
 * inode and the folder entry an empty file still costs). Never less than nbytes. */
uint64_t dp_disk_bytes(const dp_cache *c, uint64_t nbytes, bool pack);
/* Write one page, its `count` parts laid end to end (nbytes in all), into a slot: not
 * published, as create_page. */
int dp_write_slot(dp_cache *c, int cls, const struct iovec *parts, size_t count, size_t nbytes,
                  dp_page *rec);
void dp_discard_slot(dp_cache *c, dp_page *rec); /* a slot written but not published */
int dp_sync_slots(dp_cache *c, dp_page *const *recs, size_t count); /* fdatasync, once each */
int64_t dp_drain_slots(dp_cache *c);
void dp_release_deferred(dp_cache *c, struct dp_segment *s); /* its lock held */
/* trim.c. The reaper: give back the blocks of freed slots, in runs, and cut a free tail; under a
 * budget at once, else what has been spare for 0.1 s. True if some is left to give
 * back later (the reaper keeps ticking until it is). */
bool dp_trim(dp_cache *c);
/* the last pin of a record went: its bytes are free (uncharge, give the slot back) */
void dp_unpin(dp_page *p, bool removal);
/* In a forked child: the tag of a packed page's slot still names the page. */
bool dp_slot_is(const dp_page *p);

/* remove.c: unlink names relative to dirfd, overlapping the device waits where it can.
 * results[i] is 0 or -errno for names[i]. */
dp_remover *dp_remover_new(int mode);
void dp_remover_free(dp_remover *r);
int dp_remover_kind(const dp_remover *r);
void dp_remove_names(dp_remover *r, int dirfd, char *const *names, size_t count, int *results);

/* queue.c: the release queue and the reaper */
int64_t dp_drain_locked(dp_cache *c);
/* drain_lock held: let go of the viewed files no borrower maps any more (all: at close) */
void dp_poll_viewed(dp_cache *c, bool all);
/* the hold lets go: release, close a builder's fd, put; true if the collector released it */
bool dp_drop_record(dp_page *p);
void dp_page_let_go(void *p); /* what a page's hold does on letting go (dp_drop_record) */
void *dp_reaper_main(void *arg);
void dp_wake_reaper(dp_cache *c);

/* pin.c: take a pin if the record's bytes are still there (pins above 0); the fd a pin
 * reads by (the page's file, or a dup of its segment's), and the bytes' offset in it */
bool dp_pin_take(dp_page *p);
int dp_pinned_fd(dp_cache *c, dp_page *p, uint64_t *offset);

/* newfile.c: a new page's file, from its record to its publishing (see there) */
int dp_enter_write(dp_cache *c); /* closing held shared: 0, -DP_EFORKED or -DP_ECLOSED */
dp_page *dp_new_record(dp_cache *c, size_t nbytes);
int dp_open_nameless(dp_cache *c, int access, const char *name, bool *named);
int dp_open_new_page(dp_cache *c, size_t nbytes, int access, dp_page **out);
int dp_link_fd(dp_cache *c, int fd, const char *name);
int dp_link_page(dp_cache *c, dp_page *p, int fd);
void dp_publish(dp_cache *c, dp_page *p);
void dp_discard_page(dp_cache *c, dp_page *rec);
int dp_sync_folder(dp_cache *c);

/* write.c: the writes, hand over and adopt (it declares nothing here: nothing below
 * calls it) */

/* cache.c: the cache's open and close, the top of the graph */
int dp_close_locked(dp_cache *c); /* the caller has entered the cache's hold */
/* remove every entry of a folder; the count removed or the first -errno */
int64_t dp_empty_dir(dp_remover *r, int dirfd);

/* pageobj.c: the Python page type (PageBase), beside cache.c at the top: it makes pages
 * through dp_write and dp_write_many and drops their holds; it alone includes Python.h */

#endif
