/* Whole reads, writes and copies on file descriptors: each resumes after a short count and
 * EINTR, so a caller sees all its bytes moved or an error. Calls no other file. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/uio.h>
#include <unistd.h>

#include "internal.h"

int dp_pwritev_all(int fd, struct iovec *iov, size_t count, off_t off)
{
    for (;;) {
        while (count && iov->iov_len == 0) { /* empty parts: nothing to write, skip them */
            iov++;
            count--;
        }
        if (!count)
            return 0;
        /* Linux writes at most 2 GiB a call, and takes at most IOV_MAX parts */
        ssize_t n = pwritev(fd, iov, count < IOV_MAX ? (int)count : IOV_MAX, off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (n == 0)
            return -EIO; /* no progress on a regular file: do not spin */
        off += n;
        for (size_t left = (size_t)n; left;) { /* drop what was written */
            size_t step = left < iov->iov_len ? left : iov->iov_len;
            iov->iov_base = (char *)iov->iov_base + step;
            iov->iov_len -= step;
            left -= step;
            if (iov->iov_len == 0) {
                iov++;
                count--;
            }
        }
    }
}

int dp_pread_exactly(int fd, void *buf, size_t nbytes, uint64_t offset)
{
    for (size_t done = 0; done < nbytes;) {
        ssize_t n = pread(fd, (char *)buf + done, nbytes - done, (off_t)(offset + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -errno;
        if (n == 0)
            return -DP_ESIZE; /* shorter than the page */
        done += (size_t)n;
    }
    return 0;
}

/* Copy nbytes of src, from offset `from`, to fd from offset 0: copy_file_range (the kernel
 * copies, or shares blocks where the file system can), else read and write through a
 * buffer. */
int dp_copy_file(int src, uint64_t from, int fd, size_t nbytes)
{
    off_t in = (off_t)from, done = 0; /* copy_file_range advances both */
    while ((size_t)done < nbytes) {
        ssize_t n = copy_file_range(src, &in, fd, &done, nbytes - (size_t)done, 0);
        if (n > 0)
            continue;
        if (n == 0)
            return -DP_ESIZE; /* the source is shorter than it said */
        if (errno == EINTR)
            continue;
        if (errno != EXDEV && errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP)
            return -errno;
        break; /* not between these two files: by hand, from where it stopped */
    }
    enum { CHUNK = 1 << 20 };
    char *buf = (size_t)done < nbytes ? malloc(CHUNK) : NULL;
    if ((size_t)done < nbytes && !buf)
        return -ENOMEM;
    int err = 0;
    while (!err && (size_t)done < nbytes) {
        size_t want = nbytes - (size_t)done < CHUNK ? nbytes - (size_t)done : CHUNK;
        struct iovec iov = {buf, want};
        if (!(err = dp_pread_exactly(src, buf, want, from + (uint64_t)done)) &&
            !(err = dp_pwritev_all(fd, &iov, 1, done)))
            done += (off_t)want;
    }
    free(buf);
    return err;
}
