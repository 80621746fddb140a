/* A C-level stress test of csrc/: threads write, release (their own pages and each
 * other's), drop and flush at once while the reaper drains; calls through a hold race its
 * drop; the cache is closed under load and let go of before its last pages, which must
 * free it (the leak checker says so). Built and run under ThreadSanitizer and
 * AddressSanitizer+UBSan by tests/test_sanitizers.py; exits non-zero on any inconsistency,
 * and the sanitizers abort on any race, leak or memory error. */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "diskpages.h"

#define THREADS 6
#define ROUNDS 400
#define SHARED 64

static dp_hold cache_hold, *cache = &cache_hold;
static _Atomic(dp_hold *) shared[SHARED]; /* pages any thread may release */

/* A page's hold, as Python's ffi.new gives it: zeroed memory its owner frees after the drop */
static dp_hold *new_hold(void)
{
    dp_hold *h = calloc(1, sizeof *h);
    if (!h) {
        fprintf(stderr, "stress: out of memory\n");
        exit(1);
    }
    return h;
}

static void drop(dp_hold *h)
{
    dp_page_drop(h);
    dp_page_drop(h); /* a second drop does nothing */
    free(h);
}

static void fail(const char *what, int err)
{
    fprintf(stderr, "stress: %s: %s\n", what, strerror(-err));
    exit(1);
}

/* Page files, plus slots whose tag holds a page, in the folder. */
static size_t count_pages(const char *dir)
{
    size_t n = 0;
    DIR *d = opendir(dir);
    for (struct dirent *e; (e = readdir(d));) {
        size_t len = strlen(e->d_name);
        if (e->d_name[0] == '.')
            continue;
        if (len < 6 || strcmp(e->d_name + len - 6, ".slots") != 0) {
            n++;
            continue;
        }
        int fd = openat(dirfd(d), e->d_name, O_RDONLY | O_CLOEXEC);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) != 0)
            fail("open a segment", -1);
        uint64_t slots = ((uint64_t)st.st_size - DP_TAGS_BYTES) / strtoull(e->d_name, NULL, 10);
        for (uint64_t i = 0; i < slots; i++) {
            dp_tag tag;
            if (pread(fd, &tag, sizeof tag, (off_t)(i * sizeof tag)) != (ssize_t)sizeof tag)
                fail("read a tag", -1);
            n += tag.id != 0;
        }
        close(fd);
    }
    closedir(d);
    return n;
}

static void *worker(void *arg)
{
    unsigned seed = (unsigned)(uintptr_t)arg;
    char data[5000];
    memset(data, 'x', sizeof data);
    for (int i = 0; i < ROUNDS; i++) {
        dp_hold *p = new_hold();
        size_t n = (size_t)rand_r(&seed) % sizeof data;
        int method = rand_r(&seed) % 4 == 0 ? DP_WRITE_MMAP : DP_WRITE_PWRITE;
        int64_t id = dp_write(cache, data, n, method, p);
        if (id <= 0)
            fail("dp_write", (int)id);
        switch (rand_r(&seed) % 4) {
        case 0: /* the owner drops it at once (refcount death) */
            drop(p);
            break;
        case 1: /* explicit release, then the owner's drop */
            dp_page_release(p);
            dp_page_release(p);
            drop(p);
            break;
        case 2: { /* hand ownership to the shared table; drop what was there */
            dp_hold *old = atomic_exchange(&shared[rand_r(&seed) % SHARED], p);
            if (old)
                drop(old);
            break;
        }
        default: { /* take a page another thread put in the table, release it twice
                    * (explicitly, then by dropping), racing that thread's own work */
            int slot = rand_r(&seed) % SHARED;
            dp_hold *q = atomic_exchange(&shared[slot], NULL);
            if (q) {
                dp_page_release(q);
                drop(q);
            }
            drop(p);
        }
        }
        if (rand_r(&seed) % 50 == 0)
            dp_flush(cache);
    }
    return NULL;
}

static atomic_bool closed;

static void *write_until_closed(void *arg)
{
    (void)arg;
    char data[64] = {0};
    for (;;) {
        dp_hold *p = new_hold();
        int64_t id = dp_write(cache, data, sizeof data, DP_WRITE_PWRITE, p);
        int err = id < 0 ? (int)id : 0;
        if (err == -DP_ECLOSED) {
            free(p);
            return NULL;
        }
        if (err)
            fail("dp_write under close", err);
        drop(p);
    }
}

/* Calls through holds racing their drop: a zombie Python object used from another thread
 * while its finalizer runs. The holds' memory stays (as the object would); what they held
 * must be let go of exactly once, by whoever is last. */
#define RACES 3000
static dp_hold race_holds[RACES];
static atomic_int race_next; /* holds [0, race_next) are written */

static void *use_while_dropped(void *arg)
{
    (void)arg;
    unsigned seed = 7;
    while (atomic_load(&race_next) < RACES) {
        int n = atomic_load(&race_next);
        if (n == 0)
            continue;
        int idx = rand_r(&seed) % n;
        dp_hold *h = &race_holds[idx];
        dp_hold pin = {0};
        uint64_t offset;
        int fd = dp_page_pin(h, &pin, &offset); /* a pin racing the drop: it must hold */
        if (fd >= 0) {
            if (rand_r(&seed) % 4 == 0)
                usleep(200); /* hold the pin while the writer drops, drains and reuses */
            char byte;
            /* each page's bytes are its own: a slot reused under a pin would show another's */
            if (pread(fd, &byte, 1, (off_t)offset) != 1 || byte != (char)(idx % 251 + 1))
                fail("a pinned page's bytes", -1);
            dp_pin_drop(&pin);
        } else if (fd != -DP_ERELEASED) {
            fail("dp_page_pin of a live or dropped page", fd);
        }
        dp_page_released(h);
        if (rand_r(&seed) % 8 == 0)
            dp_page_release(h);
    }
    return NULL;
}

static void race_drops(void)
{
    pthread_t user;
    pthread_create(&user, NULL, use_while_dropped, NULL);
    char data[100];
    for (int i = 0; i < RACES; i++) {
        memset(data, i % 251 + 1, sizeof data);
        int64_t id = dp_write(cache, data, sizeof data, DP_WRITE_PWRITE, &race_holds[i]);
        if (id <= 0)
            fail("dp_write", (int)id);
        atomic_store(&race_next, i + 1);
        dp_page_drop(&race_holds[i > 0 ? i - 1 : 0]);
    }
    dp_page_drop(&race_holds[RACES - 1]);
    pthread_join(user, NULL);
    dp_flush(cache);
}

static void *flush_until_closed(void *arg)
{
    (void)arg;
    while (!atomic_load(&closed))
        dp_flush(cache);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: stress DIR\n");
        return 2;
    }
    int dirfd = open(argv[1], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0)
        fail("open", -1);
    int remover = getenv("DP_LOOP") ? DP_REMOVE_LOOP : DP_REMOVE_AUTO;
    /* DP_PACK=1: pages up to 4 KiB are packed, the rest (up to 5000 bytes) are files */
    uint64_t pack_max = getenv("DP_PACK") ? 4096 : 0;
    int err = dp_cache_open(dirfd, DP_SYNC_NONE, 16, 1000000, remover, 1ull << 40, pack_max,
                            cache);
    if (err)
        fail("dp_cache_open", err);
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++)
        pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)(i + 1));
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);

    size_t kept = 0;
    for (int i = 0; i < SHARED; i++)
        if (atomic_load(&shared[i]))
            kept++;
    dp_flush(cache);
    dp_stats s;
    dp_cache_stats(cache, &s);
    if (s.written != (uint64_t)THREADS * ROUNDS || s.live_pages != kept || s.pending != 0 ||
        s.removed != s.written - kept || s.remove_errors != 0) {
        fprintf(stderr, "stress: inconsistent stats: written %llu live %llu (kept %zu) pending %llu removed %llu errors %llu\n",
                (unsigned long long)s.written, (unsigned long long)s.live_pages, kept,
                (unsigned long long)s.pending, (unsigned long long)s.removed,
                (unsigned long long)s.remove_errors);
        return 1;
    }
    size_t files = count_pages(argv[1]);
    if (files != kept) {
        fprintf(stderr, "stress: %zu files and tagged slots for %zu live pages\n", files, kept);
        return 1;
    }
    /* Phase 2, close under load: writers that never pause (close must not starve behind
     * them), flushers that race close for the remover, releases of the shared pages. */
    race_drops();
    dp_cache_stats(cache, &s);
    if (s.live_pages != kept || s.pending != 0 || s.written != (uint64_t)THREADS * ROUNDS + RACES) {
        fprintf(stderr, "stress: after the drop races: live %llu (kept %zu) pending %llu\n",
                (unsigned long long)s.live_pages, kept, (unsigned long long)s.pending);
        return 1;
    }
    /* A page kept past the cache's own end: its record keeps the cache's memory. */
    dp_hold *survivor = new_hold();
    int64_t survivor_id = dp_write(cache, "last", 4, DP_WRITE_PWRITE, survivor);
    if (survivor_id <= 0)
        fail("dp_write", (int)survivor_id);
    pthread_t writers[4], flushers[2];
    for (int i = 0; i < 4; i++)
        pthread_create(&writers[i], NULL, write_until_closed, NULL);
    for (int i = 0; i < 2; i++)
        pthread_create(&flushers[i], NULL, flush_until_closed, NULL);
    for (int i = 0; i < SHARED; i++) {
        dp_hold *p = atomic_exchange(&shared[i], NULL);
        if (p)
            drop(p);
    }
    usleep(50000);
    if ((err = dp_cache_close(cache)))
        fail("dp_cache_close", err);
    atomic_store(&closed, true);
    for (int i = 0; i < 4; i++)
        pthread_join(writers[i], NULL);
    for (int i = 0; i < 2; i++)
        pthread_join(flushers[i], NULL);
    files = 0;
    DIR *d = opendir(argv[1]);
    for (struct dirent *e; (e = readdir(d));)
        files += e->d_name[0] != '.';
    closedir(d);
    if (files != 0) {
        fprintf(stderr, "stress: %zu files left after close\n", files);
        return 1;
    }
    dp_cache_drop(cache);
    dp_cache_drop(cache);
    cache_hold.ptr = NULL; /* as when Python frees the hold's memory: only records reach it now */
    /* the cache is let go of; its last page still answers, as released */
    dp_hold pin = {0};
    uint64_t offset;
    if (dp_page_pin(survivor, &pin, &offset) != -DP_ERELEASED || !dp_page_released(survivor))
        fail("a page of a closed cache", -1);
    dp_page_release(survivor);
    drop(survivor); /* the cache's memory goes with it: the leak checker would see it */
    printf("ok: %llu pages written, %llu removed\n", (unsigned long long)s.written,
           (unsigned long long)s.removed);
    return 0;
}
