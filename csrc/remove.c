/* Batch removal of files relative to a directory fd.
 *
 * On this kind of disk (ext4 mounted with `discard`) each unlink of a file with data waits
 * for the device; a loop of unlinkat() pays those waits one after another. io_uring's
 * IORING_OP_UNLINKAT runs each removal in a kernel worker, so the waits overlap. We talk
 * to io_uring through <linux/io_uring.h> and raw system calls (no liburing), and fall
 * back to the plain loop when the kernel refuses the ring or the operation.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/version.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "internal.h"

/* IORING_OP_UNLINKAT came with Linux 5.11's headers; built against older ones, diskpages
 * has only the loop (and a new kernel is still used through it at run time). */
#if defined(__has_include) && __has_include(<linux/io_uring.h>) && \
    LINUX_VERSION_CODE >= KERNEL_VERSION(5, 11, 0)
#define DP_HAVE_URING 1
#include <linux/io_uring.h>
#else
#define DP_HAVE_URING 0
struct io_uring_sqe;
struct io_uring_cqe;
#endif

#define RING_ENTRIES 64u

struct dp_remover {
    int kind; /* DP_REMOVE_LOOP or DP_REMOVE_URING */
    unsigned trust_ring; /* batches left that take the ring without a probe */
    bool always_ring;    /* asked for (DP_REMOVE_URING): never probe */
    int ring_fd;
    void *sq_map, *cq_map;
    size_t sq_map_len, cq_map_len;
    struct io_uring_sqe *sqes;
    size_t sqes_len;
    unsigned sq_entries;
    _Atomic unsigned *sq_head, *sq_tail, *cq_head, *cq_tail;
    unsigned sq_mask, cq_mask;
    unsigned *sq_array;
    struct io_uring_cqe *cqes;
};

static void ring_unmap(dp_remover *r)
{
    if (r->sqes)
        munmap(r->sqes, r->sqes_len);
    if (r->cq_map && r->cq_map != r->sq_map)
        munmap(r->cq_map, r->cq_map_len);
    if (r->sq_map)
        munmap(r->sq_map, r->sq_map_len);
    if (r->ring_fd >= 0)
        close(r->ring_fd);
    r->sqes = NULL;
    r->sq_map = r->cq_map = NULL;
    r->ring_fd = -1;
    r->kind = DP_REMOVE_LOOP;
}

#if DP_HAVE_URING
static int ring_setup(dp_remover *r)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    int fd = (int)syscall(__NR_io_uring_setup, RING_ENTRIES, &p);
    if (fd < 0)
        return -errno;
    r->ring_fd = fd;
    r->sq_map_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_map_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    int single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single) {
        if (r->cq_map_len > r->sq_map_len)
            r->sq_map_len = r->cq_map_len;
        r->cq_map_len = r->sq_map_len;
    }
    r->sq_map = mmap(NULL, r->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                     fd, IORING_OFF_SQ_RING);
    if (r->sq_map == MAP_FAILED) {
        r->sq_map = NULL;
        goto fail;
    }
    if (single) {
        r->cq_map = r->sq_map;
    } else {
        r->cq_map = mmap(NULL, r->cq_map_len, PROT_READ | PROT_WRITE,
                         MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
        if (r->cq_map == MAP_FAILED) {
            r->cq_map = NULL;
            goto fail;
        }
    }
    r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(NULL, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                   IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED) {
        r->sqes = NULL;
        goto fail;
    }
    char *sq = r->sq_map, *cq = r->cq_map;
    r->sq_entries = p.sq_entries;
    r->sq_head = (_Atomic unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (_Atomic unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = *(unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (_Atomic unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (_Atomic unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = *(unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    r->kind = DP_REMOVE_URING;
    return 0;
fail:;
    int err = -errno;
    ring_unmap(r);
    return err;
}

#else
static int ring_setup(dp_remover *r)
{
    (void)r;
    return -ENOSYS;
}
#endif

dp_remover *dp_remover_new(int mode)
{
    dp_remover *r = calloc(1, sizeof *r);
    if (!r)
        return NULL;
    r->ring_fd = -1;
    r->kind = DP_REMOVE_LOOP;
    r->always_ring = mode == DP_REMOVE_URING;
    if (mode != DP_REMOVE_LOOP)
        ring_setup(r); /* on failure r stays a loop remover */
    return r;
}

void dp_remover_free(dp_remover *r)
{
    if (!r)
        return;
    ring_unmap(r);
    free(r);
}

int dp_remover_kind(const dp_remover *r)
{
    return r->kind;
}

static void remove_loop(int dirfd, char *const *names, size_t count, int *results)
{
    for (size_t i = 0; i < count; i++) {
        int err;
        do /* a signal can cut short an unlink that waits for the device (a TRIM) */
            err = unlinkat(dirfd, names[i], 0) == 0 ? 0 : -errno;
        while (err == -EINTR);
        results[i] = err;
    }
}

#if DP_HAVE_URING
/* Submit up to sq_entries unlinks and wait for all of them. Returns 0, or -errno if the
 * ring failed; results[i] stays INT_MIN for every removal that did not complete. */
static int ring_round(dp_remover *r, int dirfd, char *const *names, size_t count,
                      int *results)
{
    /* We are the only producer (drains are serialised), so a relaxed read of our own tail
     * is enough; the release store publishes the filled entries to the kernel. */
    unsigned tail = atomic_load_explicit(r->sq_tail, memory_order_relaxed);
    for (size_t i = 0; i < count; i++) {
        unsigned idx = (tail + (unsigned)i) & r->sq_mask;
        struct io_uring_sqe *sqe = &r->sqes[idx];
        memset(sqe, 0, sizeof *sqe);
        sqe->opcode = IORING_OP_UNLINKAT;
        sqe->fd = dirfd;
        sqe->addr = (uint64_t)(uintptr_t)names[i];
        sqe->unlink_flags = 0;
        sqe->user_data = i;
        r->sq_array[idx] = idx;
        results[i] = INT_MIN;
    }
    atomic_store_explicit(r->sq_tail, tail + (unsigned)count, memory_order_release);

    unsigned to_submit = (unsigned)count, done = 0;
    while (done < count) {
        long ret = syscall(__NR_io_uring_enter, r->ring_fd, to_submit, (unsigned)count - done,
                           IORING_ENTER_GETEVENTS, NULL, 0);
        if (ret < 0) {
            if (errno != EINTR && errno != EAGAIN && errno != EBUSY)
                return -errno;
            ret = 0; /* nothing submitted; reap what has completed, then try again */
        }
        to_submit -= (unsigned)ret < to_submit ? (unsigned)ret : to_submit;
        unsigned head = atomic_load_explicit(r->cq_head, memory_order_relaxed);
        unsigned ctail = atomic_load_explicit(r->cq_tail, memory_order_acquire);
        for (; head != ctail; head++) {
            struct io_uring_cqe *cqe = &r->cqes[head & r->cq_mask];
            if (cqe->user_data < count) {
                results[cqe->user_data] = cqe->res;
                done++;
            }
        }
        /* release: the kernel may reuse the slots only after we have read them */
        atomic_store_explicit(r->cq_head, head, memory_order_release);
    }
    return 0;
}

#else
static int ring_round(dp_remover *r, int dirfd, char *const *names, size_t count, int *results)
{
    (void)r, (void)dirfd, (void)names, (void)count, (void)results;
    return -ENOSYS; /* never reached: without the header no ring is ever set up */
}
#endif

/* Which remover a batch takes is measured: its first unlink runs inline, and the rest go
 * to the ring only if that one took more than SLOW_NS. Measured on this disk, a journaled
 * ext4 and a tmpfs (README.md, "How it works"): a file still in the page cache, or on a
 * file system that frees blocks without waiting for the device, unlinks in 7-66 us (a
 * 256 KiB file included), where the ring's hand-off to a kernel worker makes it 1.0-2.2x
 * slower; a written-back file on a disk mounted `discard` waits 1.2-1.9 ms for its TRIM,
 * and there the ring, overlapping the waits, is 3-12x faster. One probe costs such a
 * disk a whole TRIM wait, so once the ring is chosen the next batches take it without a
 * probe, and every TRUST_BATCHES-th batch probes again. */
#define SLOW_NS 150000
#define TRUST_BATCHES 8

void dp_remove_names(dp_remover *r, int dirfd, char *const *names, size_t count, int *results)
{
    size_t i = 0;
    if (r->kind == DP_REMOVE_URING && count > 1 && r->trust_ring == 0 && !r->always_ring) {
        uint64_t start = dp_now_ns();
        remove_loop(dirfd, names, 1, results);
        i = 1;
        if (dp_now_ns() - start < SLOW_NS) {
            remove_loop(dirfd, names + i, count - i, results + i);
            return;
        }
        r->trust_ring = TRUST_BATCHES; /* slow: the ring for this batch and the next ones */
    }
    if (r->trust_ring)
        r->trust_ring--;
    while (i < count && r->kind == DP_REMOVE_URING) {
        size_t n = count - i;
        if (n > r->sq_entries)
            n = r->sq_entries;
        int err = ring_round(r, dirfd, names + i, n, results + i);
        int unsupported = 0;
        for (size_t k = 0; k < n; k++) {
            if (results[i + k] == -EINVAL)
                unsupported = 1; /* a kernel without IORING_OP_UNLINKAT */
            if (results[i + k] == -EINTR) /* cut short by a signal: do it again */
                remove_loop(dirfd, names + i + k, 1, results + i + k);
        }
        if (err || unsupported) {
            /* Give up on the ring for good; redo what did not complete in the loop. A
             * removal that did complete and is redone just finds ENOENT. */
            ring_unmap(r);
            for (size_t k = 0; k < n; k++)
                if (results[i + k] == INT_MIN || results[i + k] == -EINVAL)
                    remove_loop(dirfd, names + i + k, 1, results + i + k);
        }
        i += n;
    }
    if (i < count)
        remove_loop(dirfd, names + i, count - i, results + i);
}
