/* diskpages C API: the one contract between csrc/ and Python.
 *
 * This file is read verbatim by cffi's cdef (see csrc/build_ffi.py), so it holds plain
 * declarations only: no #include, no #ifdef, no attributes. Every function that can fail
 * returns 0 (or a count, or an fd) on success and -errno on failure; nothing prints.
 * The C files include <stdint.h> and <stddef.h> before this header.
 */

typedef struct dp_cache dp_cache; /* one cache folder: its dirfd, release queue, reaper */
typedef struct dp_page dp_page;   /* one page's record: id, size, link in the queue */

/* sync modes */
enum { DP_SYNC_NONE = 0, DP_SYNC_DATA = 1, DP_SYNC_FULL = 2 };
/* how dp_write puts the bytes in the file */
enum { DP_WRITE_PWRITE = 0, DP_WRITE_MMAP = 1 };
/* how a drain removes files: asked for (AUTO, LOOP) and in use (LOOP, URING) */
enum { DP_REMOVE_AUTO = 0, DP_REMOVE_LOOP = 1, DP_REMOVE_URING = 2 };
/* our own error codes, returned negated like errno and kept clear of errno's range */
enum { DP_ECLOSED = 10001, DP_ESIZE = 10002, DP_EFORKED = 10003, DP_EFULL = 10004 };

typedef struct dp_stats {
    uint64_t live_pages;    /* written, not yet released */
    uint64_t live_bytes;
    uint64_t pending;       /* released, file not yet removed */
    uint64_t pending_bytes;
    uint64_t removed;       /* files removed (or found already gone) */
    uint64_t remove_errors; /* removals that failed with another error */
    uint64_t written;       /* pages written since the cache opened */
    /* why pages were released; the four add up to every page released */
    uint64_t released_by_refcount; /* their object's last reference went */
    uint64_t released_by_gc;       /* the cycle collector freed their object */
    uint64_t released_explicitly;  /* dp_release (Page.release(), a with block) */
    uint64_t released_at_close;    /* still live when the cache closed */
    uint64_t charged_bytes; /* what max_bytes counts: live and pending bytes, writes under
                             * way, and files whose removal failed (until close) */
    int remover;            /* DP_REMOVE_LOOP or DP_REMOVE_URING: what drains use now */
} dp_stats;

/* Take ownership of dirfd (closed by dp_cache_free) and start the reaper thread, which
 * drains the release queue once `batch` releases are waiting or `max_delay_ns` has passed.
 * remover: DP_REMOVE_AUTO (io_uring where the kernel allows, else the loop) or
 * DP_REMOVE_LOOP; dp_stats.remover says which one is in use. max_bytes, if not 0, caps the
 * bytes of live and pending pages: a write that would pass it fails with -DP_EFULL. */
int dp_cache_open(int dirfd, int sync, unsigned batch, uint64_t max_delay_ns, int remover,
                  uint64_t max_bytes, dp_cache **out);
/* Stop the reaper, remove every queued page and then every file in the folder (the folder
 * itself stays: Python removes it by path). Later writes fail with -DP_ECLOSED; releases
 * are still accepted. Each call empties the folder again (so a failed close can be
 * retried); calls must not overlap. Returns the first removal error, if any. In a forked
 * child it removes nothing and returns -DP_EFORKED: the folder is the parent's. */
int dp_cache_close(dp_cache *c);
/* Free the cache and every record still queued. Only once nothing can release into it. */
void dp_cache_free(dp_cache *c);
void dp_cache_stats(dp_cache *c, dp_stats *out);

/* Write one page; on failure no file is left. In a forked child: -DP_EFORKED. */
int dp_write(dp_cache *c, const void *data, size_t nbytes, int method, dp_page **page,
             uint64_t *id);
/* Write `count` pages, all or nothing: on failure every file this call made is removed,
 * *failed_at tells which buffer failed, and with DP_SYNC_FULL the folder is fsynced once. */
int dp_write_many(dp_cache *c, const void *const *data, const size_t *nbytes, size_t count,
                  int method, dp_page **pages, uint64_t *ids, size_t *failed_at);
/* Write one page made of `count` buffers laid end to end, with pwritev (a header and its
 * data without joining them in memory); otherwise as dp_write with DP_WRITE_PWRITE. */
int dp_write_parts(dp_cache *c, const void *const *parts, const size_t *sizes, size_t count,
                   dp_page **page, uint64_t *id);
/* Create a page of nbytes for writing in place: returns an O_RDWR fd (the caller maps it,
 * and keeps it until dp_seal) with the blocks already allocated, so stores through the
 * mapping cannot meet ENOSPC. The file has no name until dp_seal gives it one, so a crash
 * or a dropped builder leaves nothing. The page counts as live from now. */
int dp_allocate(dp_cache *c, size_t nbytes, dp_page **page, uint64_t *id);
/* Name a page written in place (fd from dp_allocate, still open) and make the name durable
 * per the sync mode (msync of the mapping is the caller's; this fsyncs the folder under
 * DP_SYNC_FULL). On failure the page is nameless again and dp_seal may be called again. */
int dp_seal(dp_cache *c, dp_page *p, int fd);

/* Open a page for reading: an fd, or -ENOENT, or -DP_ESIZE if the file is not nbytes long. */
int dp_open_page(dp_cache *c, uint64_t id, uint64_t nbytes);
/* Map fd read-only over [addr, addr + nbytes), an existing mapping the caller owns
 * (MAP_FIXED). */
int dp_map_fixed(int fd, void *addr, size_t nbytes);

/* The release path: O(1), lock-free, no system call, safe from any thread, from a
 * finalizer, during a garbage collection and at interpreter shutdown. Idempotent. */
void dp_release(dp_page *p);
int dp_released(const dp_page *p);
/* The owning object is gone: release if not yet released and let the record be freed.
 * Counted as released by the cycle collector when dropped in the thread that dp_gc_phase
 * says is collecting. */
void dp_page_drop(dp_page *p);

/* The cycle collector starts (1) or ends (0) in the calling thread: called from a gc
 * callback. dp_gc_collecting: a collection runs, in any thread; dp_gc_collecting_here:
 * in the calling thread. */
void dp_gc_phase(int collecting);
int dp_gc_collecting(void);
int dp_gc_collecting_here(void);
/* How many pages the collector released since the last call (for every cache). */
uint64_t dp_gc_take_releases(void);
/* Ask the reaper to drain now (after a collection released pages), without waiting. */
void dp_kick(dp_cache *c);

/* Remove every queued page now, in the caller's thread; returns how many files went
 * (already gone counts; a removal that fails is counted in remove_errors instead). */
int64_t dp_flush(dp_cache *c);

/* The file name of page `id` (at most 32 bytes with the NUL). */
void dp_page_name(uint64_t id, char *buf);

/* Remove every entry of the folder open at dirfd (not the folder itself), in batches.
 * For the crash sweep: the caller holds the folder's lock. Returns how many entries went,
 * or -errno (the first error; what could be removed is removed). */
int64_t dp_empty_folder(int dirfd);
