/* What every layer reads and nothing below it: the monotonic clock, and the process's pid
 * without a system call. The bottom of the call graph: it calls no other file. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

uint64_t dp_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The process's pid, refreshed in a forked child by an atfork handler: the ownership
 * checks on the write and close paths cost a load instead of a getpid() system call. */
static atomic_int current_pid;
static pthread_once_t pid_once = PTHREAD_ONCE_INIT;

static void refresh_pid(void)
{
    atomic_store_explicit(&current_pid, (int)getpid(), memory_order_relaxed);
}

static void init_pid(void)
{
    refresh_pid();
    pthread_atfork(NULL, NULL, refresh_pid);
}

pid_t dp_pid(void)
{
    pthread_once(&pid_once, init_pid);
    return (pid_t)atomic_load_explicit(&current_pid, memory_order_relaxed);
}
