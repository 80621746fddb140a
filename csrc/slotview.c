/* Views of slots across fork: the registry of views that map a segment shared, and the
 * pthread_atfork handlers that keep a forked child's copy of each view its own.
 *
 * Below the segments (pack.c), which start it (dp_slot_views_init); it reads the segments'
 * tags through internal.h's structs, and calls no file but the clock. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>

#include "internal.h"

/* Views of slots and fork. A view maps the segment shared, so a child that inherits it
 * would see the slot's next page once the parent reuses the slot: the child's pins are
 * in the child's memory, out of the parent's sight. So every view of a slot is
 * registered; before a fork each registered view's slot counts one more viewer in its
 * tag (shared memory), which keeps the parent from reusing it (give_back defers it); in
 * the child, each view is copied into private memory at the same address (mremap), and
 * the viewer is counted out again. A child's own views of slots are checked copies
 * (dp_pin_map), never shared. */
static pthread_mutex_t views_lock = PTHREAD_MUTEX_INITIALIZER;
static dp_pin *views;

static _Atomic(uint64_t) *viewers_of(dp_pin *v)
{
    struct dp_segment *s = &v->rec->cache->segs[v->rec->cls];
    return s->tags ? (_Atomic(uint64_t) *)&s->tags[v->rec->slot].viewers : NULL;
}

static void before_fork(void)
{
    pthread_mutex_lock(&views_lock);
    for (dp_pin *v = views; v; v = v->next) {
        struct dp_segment *s = &v->rec->cache->segs[v->rec->cls];
        pthread_mutex_lock(&s->lock); /* the tags stay mapped (close unmaps them under it) */
        _Atomic(uint64_t) *n = viewers_of(v);
        if (n)
            atomic_fetch_add(n, 1);
        pthread_mutex_unlock(&s->lock);
    }
}

static void after_fork_parent(void)
{
    pthread_mutex_unlock(&views_lock);
}

static void unlink_view(dp_pin *v)
{
    if (v->prev)
        v->prev->next = v->next;
    else
        views = v->next;
    if (v->next)
        v->next->prev = v->prev;
    v->registered = false;
}

static void after_fork_child(void)
{
    /* One thread, the parent's locks as they were: only the views lock, which we hold. */
    for (dp_pin *v = views, *next; v; v = next) {
        next = v->next;
        void *copy = mmap(NULL, v->len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (copy == MAP_FAILED)
            continue; /* the view stays shared, and counted: the slot stays the parent's */
        memcpy(copy, v->addr, v->len);
        mprotect(copy, v->len, PROT_READ);
        if (mremap(copy, v->len, v->len, MREMAP_MAYMOVE | MREMAP_FIXED, v->addr) == MAP_FAILED) {
            munmap(copy, v->len);
            continue;
        }
        _Atomic(uint64_t) *n = viewers_of(v);
        if (n)
            atomic_fetch_sub(n, 1);
        unlink_view(v);
    }
    pthread_mutex_unlock(&views_lock);
}

static void init_fork_handlers(void)
{
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

void dp_slot_views_init(void)
{
    pthread_once(&fork_once, init_fork_handlers);
}

void dp_register_view(dp_pin *v)
{
    pthread_mutex_lock(&views_lock);
    v->prev = NULL;
    v->next = views;
    if (views)
        views->prev = v;
    views = v;
    v->registered = true;
    pthread_mutex_unlock(&views_lock);
}

void dp_unregister_view(dp_pin *v)
{
    pthread_mutex_lock(&views_lock);
    if (v->registered) {
        unlink_view(v);
        /* a child whose copy failed: its inherited view counted as a viewer until now */
        if (dp_pid() != v->rec->cache->owner) {
            _Atomic(uint64_t) *n = viewers_of(v);
            if (n)
                atomic_fetch_sub(n, 1);
        }
    }
    pthread_mutex_unlock(&views_lock);
}
