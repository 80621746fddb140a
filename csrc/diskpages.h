/* diskpages C API: the one contract between csrc/ and Python.
 *
 * This file is read verbatim by cffi's cdef (see csrc/build_ffi.py), so it holds plain
 * declarations only: no #include, no #ifdef, no attributes. Every function that can fail
 * returns 0 (or a count, or an fd) on success and -errno on failure; nothing prints.
 * The C files include <stdint.h> and <stddef.h> before this header.
 */

typedef struct dp_cache dp_cache; /* one cache folder: its dirfd, release queue, reaper */
typedef struct dp_page dp_page;   /* one page's record: id, size, link in the queue */

/* A Python object's hold on a C object (a cache, a page record, a pin). The memory is the
 * Python object's own: inside a page object (PageBase, csrc/pageobj.c), or a cdata
 * (ffi.new) for a cache or a pin. So it stays valid for as long as that object can be
 * reached, even after its finalizer has run (resurrection, gc.garbage). Its finalizer is
 * C, so no exception can cut it short (the page type's tp_finalize and tp_dealloc, or
 * ffi.gc), and it exists before the call that fills the hold, so what C hands over is owned
 * at once. C fills `ptr`; the finalizer (dp_cache_drop, dp_page_drop, dp_pin_drop) lets go
 * of it; a call made through the hold meanwhile keeps it from being let go under the call,
 * and a call after it finds nothing. Python never reads the fields: every call below takes
 * the hold. */
typedef struct dp_hold {
    uint64_t state; /* users and flags, changed only atomically by C */
    void *ptr;      /* the dp_cache or dp_page held */
} dp_hold;

/* sync modes */
enum { DP_SYNC_NONE = 0, DP_SYNC_DATA = 1, DP_SYNC_FULL = 2 };
/* how dp_write puts the bytes in the file */
enum { DP_WRITE_PWRITE = 0, DP_WRITE_MMAP = 1 };
/* how a drain removes files: asked for (AUTO: measured per batch, LOOP, URING: the ring for
 * every batch where the kernel allows) and in use (LOOP, URING) */
enum { DP_REMOVE_AUTO = 0, DP_REMOVE_LOOP = 1, DP_REMOVE_URING = 2 };
/* our own error codes, returned negated like errno and kept clear of errno's range.
 * DP_ERELEASED: the page was released, its hold let go of it, or its cache closed. */
enum { DP_ECLOSED = 10001, DP_ESIZE = 10002, DP_EFORKED = 10003, DP_EFULL = 10004,
       DP_ERELEASED = 10005 };

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
    uint64_t released_explicitly;  /* dp_page_release (Page.release(), a with block) */
    uint64_t released_at_close;    /* still live when the cache closed */
    uint64_t charged_bytes; /* what max_bytes counts: what live and pending pages, writes
                             * under way, pinned pages, and files whose removal failed (until
                             * close) take on disk (dp_charge_for) */
    uint64_t live_disk_bytes;    /* what the live pages take on disk (charged for them) */
    uint64_t pending_disk_bytes; /* and the pending ones */
    uint64_t pinned;        /* released and removed, but still read through a view: one of
                             * this process's, or a borrower's in any process (a page file) */
    uint64_t pinned_bytes;  /* what they take on disk, charged until the last view dies */
    uint64_t handed;        /* names made by dp_hand_over, not yet adopted (unlinked) */
    uint64_t handed_bytes;  /* their bytes (not charged: see dp_hand_over) */
    int remover;            /* DP_REMOVE_LOOP or DP_REMOVE_URING: what drains use now */
} dp_stats;

/* Packed pages. A page of at most pack_max bytes (dp_cache_open) is a slot in a segment
 * file, one per size class, named "<slot size>.slots" in the cache's folder. A segment
 * starts with DP_MAX_SLOTS tags (dp_tag), one per slot; slot i's bytes are at
 * DP_TAGS_BYTES + i * slot size, padded with zeros to the slot's first 4 KiB boundary. A
 * tag says which page the slot holds: its id is set (after the bytes) when a page takes
 * the slot, and 0 from the page's removal on, so a reader in another process (or a forked
 * child) who finds the same id before and after reading the bytes read that page's
 * bytes. */
enum { DP_MAX_SLOTS = 1048576, DP_TAGS_BYTES = 33554432, DP_PACK_LIMIT = 1048576 };
typedef struct dp_tag {
    uint64_t id;
    uint64_t nbytes;
    uint64_t written_ns; /* when the page was written (CLOCK_REALTIME) */
    uint64_t viewers;    /* views forked children inherited and have not yet copied */
} dp_tag;

/* Ownership. A cache lives while its hold has it or any record does; a record lives while
 * its hold has it or its file waits in the release queue. So nothing is freed while anything
 * can reach it, whatever order Python finalizes objects in. */

/* Take ownership of dirfd and start the reaper thread, which drains the release queue once
 * `batch` releases are waiting or `max_delay_ns` has passed; the cache goes in *out, an
 * empty hold. remover: DP_REMOVE_AUTO (io_uring where the kernel allows, else the loop) or
 * DP_REMOVE_LOOP; dp_stats.remover says which one is in use. max_bytes, if not 0, caps the
 * bytes of live and pending pages: a write that would pass it fails with -DP_EFULL. */
int dp_cache_open(int dirfd, int sync, unsigned batch, uint64_t max_delay_ns, int remover,
                  uint64_t max_bytes, uint64_t pack_max, dp_hold *out);
/* Make a cache folder under the root open at rootfd, lock it, and open a cache on it, in one
 * call, so that no Python bytecode comes between the folder and its owner: the cache goes in
 * *out (an empty hold whose finalizer exists already) and its folder's name in name (32
 * bytes). The folder is made 0700 as "<pid>-<created, hex seconds>-<random>", under the
 * root's flock taken shared (a sweep takes it exclusive to pick folders), and locked with
 * an exclusive flock for the cache's whole life. The cache keeps an fd of the root of its
 * own, and its close (or its hold's finalizer) removes the folder too. On failure nothing
 * is left: no folder, no fd (rootfd stays the caller's either way). */
int dp_cache_create(int rootfd, int sync, unsigned batch, uint64_t max_delay_ns, int remover,
                    uint64_t max_bytes, uint64_t pack_max, dp_hold *out, char *name);
/* Stop the reaper, remove every queued page and then every file in the folder (the folder
 * itself stays: Python removes it by path), then close the folder's fd and the remover's.
 * Later writes fail with -DP_ECLOSED, reads with -DP_ERELEASED; releases are still
 * accepted. If a file cannot be removed it returns that error and keeps the fds, and a
 * later call empties the folder again. In a forked child it removes nothing and returns
 * -DP_EFORKED: the folder is the parent's. */
int dp_cache_close(dp_hold *cache);
/* The hold's finalizer: close the cache (errors are dropped: close() reports them) and let
 * go of it. Idempotent. */
void dp_cache_drop(dp_hold *cache);
void dp_cache_stats(dp_hold *cache, dp_stats *out);

/* The writes. Each fills empty holds with the new pages (and their ids), or on failure
 * leaves no file and fills nothing. In a forked child: -DP_EFORKED. */
/* dp_write returns the page's id (above 0), or -errno. */
int64_t dp_write(dp_hold *cache, const void *data, size_t nbytes, int method, dp_hold *page);
/* `count` pages into the holds *pages[0..count), all or nothing: on failure every file this call made
 * is removed, *failed_at tells which buffer failed, and with DP_SYNC_FULL the folder is
 * fsynced once. */
int dp_write_many(dp_hold *cache, const void *const *data, const size_t *nbytes, size_t count,
                  int method, dp_hold *const *pages, uint64_t *ids, size_t *failed_at);
/* One page made of `count` buffers laid end to end, with pwritev, never joined in memory;
 * otherwise as dp_write with DP_WRITE_PWRITE. pack: a slot if it is small enough (as
 * dp_write); 0: a file of its own, its blocks reserved first (an array page). */
int dp_write_parts(dp_hold *cache, const void *const *parts, const size_t *sizes, size_t count,
                   int pack, dp_hold *page, uint64_t *id);
/* A page of this cache made from another cache's page file, open at src (nbytes long): a
 * hard link to it where the file systems allow, else a copy of its bytes; filled into
 * `page`, an empty hold, as the writes do; then the path `handed` (a name dp_hand_over
 * made for src), unless NULL, is unlinked. Returns 1 if linked, 0 if copied, or -errno
 * (-DP_ESIZE: src is not a regular file of nbytes). */
int dp_adopt(dp_hold *cache, int src, size_t nbytes, const char *handed, dp_hold *page,
             uint64_t *id);
/* A page of nbytes to write in place: returns an O_RDWR fd that the record owns (closed by
 * dp_seal or when the hold lets go), with the blocks already allocated, so stores through a
 * mapping cannot meet ENOSPC. The file has no name until dp_seal gives it one, so a crash or
 * a dropped builder leaves nothing. The page counts as live from now. */
int dp_allocate(dp_hold *cache, size_t nbytes, dp_hold *builder, uint64_t *id);
/* The fd of a page being written in place, or -DP_ERELEASED once sealed or let go. */
int dp_builder_fd(dp_hold *builder);
/* Name a page written in place and make the name durable per the sync mode (msync of a
 * mapping is the caller's; this fsyncs the folder under DP_SYNC_FULL), close its fd and
 * move the record into `page`, an empty hold: the builder's hold has nothing after. On
 * failure the page is nameless again and dp_seal may be called again. */
int dp_seal(dp_hold *builder, dp_hold *page);

/* Pin a page for reading into `pin`, an empty hold whose finalizer is dp_pin_drop: its
 * bytes (its file, or its slot) stay as they are, and stay counted against max_bytes,
 * until the pin is dropped, even after the page is released and removed. Returns an fd
 * that the pin owns (closed by dp_pin_map or the drop) and the page's offset in it; or
 * -DP_ERELEASED, -ENOENT, or -DP_ESIZE if the file is not nbytes long. */
int dp_page_pin(dp_hold *page, dp_hold *pin, uint64_t *offset);
/* Map the pinned bytes read-only over [addr, addr + nbytes), an existing mapping the caller
 * owns (MAP_FIXED), and close the pin's fd: the mapping keeps the bytes, the pin keeps
 * them from being reused. */
int dp_pin_map(dp_hold *pin, void *addr, size_t nbytes);
/* Read the whole page (nbytes, its size) into buf, under a pin for the length of the call:
 * 0, or as dp_page_pin. */
int dp_page_read(dp_hold *page, void *buf, size_t nbytes);
void dp_pin_drop(dp_hold *pin);
/* The view's mapping is about to go (mmap.close): forget its address, which a fork would
 * otherwise copy from; dp_pin_remember undoes it if the mapping stays after all. */
void dp_pin_forget(dp_hold *pin);
void dp_pin_remember(dp_hold *pin);
/* A borrower's file (or segment): open path (never following a symlink) into *fd_box, an
 * int whose finalizer is dp_fd_box_close (so no exception can orphan the fd), if it is
 * still the one pickled: its device and inode, and its modification time and size unless
 * they are -1 (not its change time, which a hard link to it changes: Page.hand_over,
 * PageCache.adopt). 0, -ENOENT if it is gone or another file, or -errno. */
int dp_borrow_open(const char *path, uint64_t dev, uint64_t ino, int64_t mtime_ns, int64_t size,
                   int *fd_box);
/* Before a borrower maps the file open at fd (path: its name in the owner's folder): take an
 * OFD read lock on it, which every mapping made from fd keeps (in forked children too), and
 * check the name is still the file. The owner, removing a page it pickled (dp_page_share),
 * unlinks the name and then looks for such a lock in /proc/locks: if one is held, the
 * file's bytes stay pinned and charged in the owner's cache until the last mapping goes. 0, -ENOENT (the name
 * is gone or is another file: the owner removed the page), or -errno. */
int dp_borrow_view(int fd, const char *path);
/* The page is pickled: a borrower may map its file, the file dev:ino (see dp_borrow_view). */
void dp_page_share(dp_hold *page, uint64_t dev, uint64_t ino);
/* Open `path` read-only (relative to dirfd, or AT_FDCWD: -100), never following a symlink,
 * into *fd_box, an int whose finalizer is dp_fd_box_close, so that no exception can orphan
 * the fd: 0 or -errno. directory: it must be a directory (O_DIRECTORY). */
int dp_open_at(int dirfd, const char *path, int directory, int *fd_box);
void dp_fd_box_close(int *fd_box);
/* Where a page is: 1 and its slot (size, index) if packed, 0 if a file of its own, or
 * -DP_ERELEASED. */
int dp_page_slot(dp_hold *page, uint64_t *slot_size, uint64_t *slot);
/* Hand a page over (Page.hand_over): its bytes get a file of their own, `name` in the
 * cache's folder, which outlives the page (a hard link to its file; for a packed page, a
 * copy of its slot); identity[0..3) gets that file's device, inode and modification time.
 * 0, -DP_ERELEASED, -DP_ECLOSED, -DP_EFORKED, or -errno (EEXIST: the name is taken). */
int dp_hand_over(dp_hold *page, const char *name, int64_t *identity);
/* Map fd read-only over [addr, addr + nbytes), an existing mapping the caller owns
 * (MAP_FIXED). */
int dp_map_fixed(int fd, void *addr, size_t nbytes);

/* The release path: O(1), lock-free, no system call, safe from any thread, from a
 * finalizer, during a garbage collection and at interpreter shutdown. Idempotent. */
void dp_page_release(dp_hold *page);
/* 1 once the page was released, its hold let go of it, or its cache closed. */
int dp_page_released(dp_hold *page);
/* The hold's finalizer: release the page if not yet released, close a builder's fd, and let
 * go of the record. Counted as released by the cycle collector when dropped in the thread
 * that dp_gc_phase says is collecting. Idempotent. */
void dp_page_drop(dp_hold *page);
/* 1 if the cycle collector reclaims (or reclaimed) this page: dropped in the collecting
 * thread while unreleased, or about to be (unreleased, its cache open, collecting here). */
int dp_page_reclaimed_by_gc(dp_hold *page);

/* The cycle collector starts (1) or ends (0) in the calling thread: called from a gc
 * callback. dp_gc_collecting: a collection runs, in any thread; dp_gc_collecting_here:
 * in the calling thread. */
void dp_gc_phase(int collecting);
int dp_gc_collecting(void);
int dp_gc_collecting_here(void);
/* How many pages the collector released since the last call (for every cache). */
uint64_t dp_gc_take_releases(void);
/* Ask the reaper to drain now (after a collection released pages), without waiting. */
void dp_kick(dp_hold *cache);

/* What a page of nbytes would take on disk in this cache, and be charged against max_bytes:
 * its slot's whole size if `pack` and it is packed, else its file's whole 4 KiB blocks, one
 * at least (an empty file still costs an inode and a folder entry). */
uint64_t dp_charge_for(dp_hold *cache, uint64_t nbytes, int pack);

/* Remove every queued page now, in the caller's thread; returns how many files went
 * (already gone counts; a removal that fails is counted in remove_errors instead). */
int64_t dp_flush(dp_hold *cache);

/* Build the page type (PageBase, csrc/pageobj.c: a page's hold, cache, id and size in one
 * Python object) and set it on the module diskpages._native: called once at import.
 * 0, or -1 with the reason printed. */
int dp_native_init(void);

/* The file name of page `id` (at most 32 bytes with the NUL). */
void dp_page_name(uint64_t id, char *buf);
/* The file name of the segment of slot size `slot_size` (at most 32 bytes with the NUL). */
void dp_segment_name(uint64_t slot_size, char *buf);

/* Remove every entry of the folder open at dirfd (not the folder itself), in batches.
 * For the crash sweep: the caller holds the folder's lock. Returns how many entries went,
 * or -errno (the first error; what could be removed is removed). */
int64_t dp_empty_folder(int dirfd);
