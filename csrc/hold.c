/* Holds: how a Python object owns a C object without ever reaching freed memory.
 *
 * Python finalizers run once, but the object may live on after (resurrection, gc.garbage,
 * a heap walk in another thread), and a call may be under way in another thread while the
 * finalizer runs (cffi lets go of the GIL for every C call). So a Python object never holds
 * a raw pointer: it holds a dp_hold, memory it owns, and every call goes through it. The
 * state word counts the calls inside (users) and says whether the finalizer has dropped the
 * hold. The C object is let go of once, by whoever is last: the dropper if no call is
 * inside, else the last call to leave. A call that enters a dropped hold finds nothing.
 *
 * One atomic word, no lock, no system call: the finalizer's path stays what it was.
 */
#include "internal.h"

#define H_DROPPED 1u /* the finalizer ran: no new users */
#define H_EMPTY 2u   /* nothing to let go of (done already, or handed on) */
#define H_GC 4u      /* the page was reclaimed by the cycle collector */
#define H_USER 8u    /* one call inside */

static uint64_t load(dp_hold *h)
{
    return __atomic_load_n(&h->state, __ATOMIC_ACQUIRE);
}

static bool cas(dp_hold *h, uint64_t *old, uint64_t new)
{
    /* acq_rel: the one who lets go sees every write made by calls that left before. */
    return __atomic_compare_exchange_n(&h->state, old, new, true, __ATOMIC_ACQ_REL,
                                       __ATOMIC_ACQUIRE);
}

void *dp_hold_enter(dp_hold *h, void (*let_go)(void *))
{
    uint64_t old = __atomic_fetch_add(&h->state, H_USER, __ATOMIC_ACQ_REL);
    if (!(old & (H_DROPPED | H_EMPTY)) && h->ptr)
        return h->ptr;
    /* Nothing to use. But while we counted, a call that was inside may have left, leaving
     * us the last one out of a dropped hold: then letting go is ours. */
    dp_hold_leave(h, let_go);
    return NULL;
}

void dp_hold_leave(dp_hold *h, void (*let_go)(void *))
{
    uint64_t old = load(h), new;
    do {
        new = old - H_USER;
        if (new < H_USER && (old & H_DROPPED) && !(old & H_EMPTY))
            new |= H_EMPTY; /* the last one out after the drop lets go */
    } while (!cas(h, &old, new));
    if ((new & H_EMPTY) && !(old & H_EMPTY) && h->ptr)
        let_go(h->ptr);
}

bool dp_hold_drop(dp_hold *h)
{
    uint64_t old = load(h), new;
    do {
        if (old & H_DROPPED)
            return false; /* a second drop: nothing to do */
        new = old | H_DROPPED;
        if (old < H_USER && !(old & H_EMPTY))
            new |= H_EMPTY; /* no call inside: let go now */
    } while (!cas(h, &old, new));
    return (new & H_EMPTY) && !(old & H_EMPTY) && h->ptr;
}

void dp_hold_empty(dp_hold *h)
{
    __atomic_fetch_or(&h->state, H_EMPTY, __ATOMIC_ACQ_REL);
}

void dp_hold_mark_gc(dp_hold *h)
{
    __atomic_fetch_or(&h->state, H_GC, __ATOMIC_RELAXED);
}

bool dp_hold_marked_gc(dp_hold *h)
{
    return __atomic_load_n(&h->state, __ATOMIC_RELAXED) & H_GC;
}
