/* The page object: the one Python object a page is, with its hold inside it.
 *
 * A page is an instance of a Python subclass (diskpages.Page, PageBuilder) of PageBase, a
 * type built here with PyType_FromSpec under the limited API (so the wheel stays abi3)
 * and set on the cffi module by dp_native_init. Its storage holds the dp_hold (hold.c),
 * the PageCache it belongs to, and its id and size: no cdata, no second object.
 *
 * Its death drops the hold in C, with no Python frame in between: tp_finalize when the
 * collector finds it unreachable (before it checks for resurrection, so a page that comes
 * back, or stays in gc.garbage, is released and inert, its hold memory still its own) and
 * tp_dealloc when its last reference goes. dp_page_drop is idempotent, so either order is
 * safe. The object is tracked by the collector: it refers to its PageCache, and a page
 * held by a cycle must be finalized with that cycle.
 *
 * The writes of a packed page (dp_write, dp_write_many) are methods here too: the page
 * object is made, the caller's buffers exported, the bytes written (the GIL let go) and
 * the exports released in one C call, so no bytecode comes between the record and its
 * owner, and no buffer outlives the call. Errors come back as negative ints for
 * _bindings.error() to name; only Python's own (a bad buffer, no memory) are raised. */
#include <pyconfig.h>
#if !defined(Py_DEBUG) && !defined(Py_TRACE_REFS) && !defined(Py_REF_DEBUG) && \
    !defined(Py_GIL_DISABLED)
#define Py_LIMITED_API 0x030B0000 /* 3.11: the buffer protocol is in the limited API */
#endif
#include <Python.h>
#include <structmember.h>
#include <stdlib.h>

#include "internal.h"

typedef struct {
    PyObject_HEAD
    dp_hold hold;
    PyObject *cache; /* the PageCache (strong): page.cache, its folder, its budget */
    unsigned long long id, nbytes;
    int watch; /* a warn_on_gc cache's page: warn when the collector reclaims it */
} PageObject;

#define PAGE(o) ((PageObject *)(o))

static PyTypeObject *page_type; /* PageBase, once dp_native_init ran */

/* The collector reclaims a watched page: say so, as an unclosed file does. Runs in a
 * finalizer, so it keeps whatever exception is being raised, and reports its own (a
 * warning turned into an error) as unraisable. */
static void warn_reclaimed(PyObject *self)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (PyErr_WarnFormat(PyExc_ResourceWarning, 1,
                         "page %llu (%llu bytes) was reclaimed by the cycle collector, not by "
                         "refcount or release(): it was in a reference cycle",
                         PAGE(self)->id, PAGE(self)->nbytes) < 0)
        PyErr_WriteUnraisable(self);
    PyErr_Restore(type, value, tb);
}

static void page_finalize(PyObject *self)
{
    int warn = PAGE(self)->watch && dp_page_reclaimed_by_gc(&PAGE(self)->hold);
    dp_page_drop(&PAGE(self)->hold);
    if (warn)
        warn_reclaimed(self);
}

static void page_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    dp_page_drop(&PAGE(self)->hold); /* tp_finalize did, unless it never ran */
    Py_CLEAR(PAGE(self)->cache);
    PyObject_GC_Del(self);
    Py_DECREF(tp); /* an instance of a heap type holds its type */
}

static int page_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(PAGE(self)->cache);
    return 0;
}

static PyObject *new_page(PyTypeObject *cls, PyObject *cache, int watch)
{
    allocfunc alloc = (allocfunc)PyType_GetSlot(cls, Py_tp_alloc);
    PyObject *self = alloc(cls, 0); /* zeroed: an empty hold */
    if (!self)
        return NULL;
    Py_INCREF(cache);
    PAGE(self)->cache = cache;
    PAGE(self)->watch = watch;
    return self;
}

static int count_args(Py_ssize_t nargs, Py_ssize_t want)
{
    if (nargs == want)
        return 0;
    PyErr_Format(PyExc_TypeError, "expected %zd arguments, got %zd", want, nargs);
    return -1;
}

/* (cache, cache hold's address, ..., watch): the arguments of the writes. (cls is a page
 * class: METH_CLASS passes the class the method was called on.) */
static int maker_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, dp_hold **cache,
                      int *watch)
{
    if (count_args(nargs, want) < 0)
        return -1;
    *cache = PyLong_AsVoidPtr(args[1]);
    if (!*cache) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "no cache");
        return -1;
    }
    *watch = PyObject_IsTrue(args[nargs - 1]);
    return *watch < 0 ? -1 : 0;
}

/* _new(cache, watch): an empty page, for the writes made through cffi */
static PyObject *page_new_empty(PyObject *cls, PyObject *const *args, Py_ssize_t nargs)
{
    if (count_args(nargs, 2) < 0)
        return NULL;
    int watch = PyObject_IsTrue(args[1]);
    return watch < 0 ? NULL : new_page((PyTypeObject *)cls, args[0], watch);
}

/* _write(cache, cache_address, data, method, watch): the page, or a negative C error */
static PyObject *page_write(PyObject *cls, PyObject *const *args, Py_ssize_t nargs)
{
    dp_hold *cache;
    int watch;
    if (maker_args(args, nargs, 5, &cache, &watch) < 0)
        return NULL;
    int method = (int)PyLong_AsLong(args[3]);
    if (method == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[2], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *self = new_page((PyTypeObject *)cls, args[0], watch);
    if (!self) {
        PyBuffer_Release(&view);
        return NULL;
    }
    int64_t id;
    Py_BEGIN_ALLOW_THREADS
    id = dp_write(cache, view.buf, (size_t)view.len, method, &PAGE(self)->hold);
    Py_END_ALLOW_THREADS
    PAGE(self)->nbytes = (unsigned long long)view.len;
    PyBuffer_Release(&view);
    if (id < 0) {
        Py_DECREF(self); /* an empty hold: nothing to let go of */
        return PyLong_FromLongLong(id);
    }
    PAGE(self)->id = (unsigned long long)id;
    return self;
}

/* _write_many(cache, cache_address, buffers (a list), method, watch): a list of pages, or
 * (negative C error, index of the buffer that failed, or len(buffers)) */
static PyObject *page_write_many(PyObject *cls, PyObject *const *args, Py_ssize_t nargs)
{
    dp_hold *cache;
    int watch;
    if (maker_args(args, nargs, 5, &cache, &watch) < 0)
        return NULL;
    if (!PyList_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "buffers must be a list");
        return NULL;
    }
    int method = (int)PyLong_AsLong(args[3]);
    if (method == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t count = PyList_Size(args[2]);
    /* one allocation: the exports, the addresses, the sizes, the holds and the ids */
    size_t each = sizeof(Py_buffer) + sizeof(void *) + sizeof(size_t) + sizeof(dp_hold *) +
                  sizeof(uint64_t);
    char *scratch = malloc((count ? (size_t)count : 1) * each);
    PyObject *pages = PyList_New(count);
    if (!scratch || !pages) {
        free(scratch);
        Py_XDECREF(pages);
        return PyErr_NoMemory();
    }
    Py_buffer *views = (Py_buffer *)scratch;
    const void **data = (const void **)(views + count);
    size_t *sizes = (size_t *)(data + count);
    dp_hold **holds = (dp_hold **)(sizes + count);
    uint64_t *ids = (uint64_t *)(holds + count);
    Py_ssize_t exported = 0, made = 0;
    PyObject *result = NULL;
    /* every check before any file is made: each buffer, then each page object */
    for (; exported < count; exported++) {
        PyObject *item = PyList_GetItem(args[2], exported); /* borrowed; the list is ours */
        if (!item || PyObject_GetBuffer(item, &views[exported], PyBUF_SIMPLE) < 0)
            goto done;
        data[exported] = views[exported].buf;
        sizes[exported] = (size_t)views[exported].len;
    }
    for (; made < count; made++) {
        PyObject *self = new_page((PyTypeObject *)cls, args[0], watch);
        if (!self)
            goto done;
        PyList_SetItem(pages, made, self); /* steals: the list owns it from here */
        holds[made] = &PAGE(self)->hold;
        PAGE(self)->nbytes = sizes[made];
    }
    size_t failed_at = (size_t)count;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = dp_write_many(cache, data, sizes, (size_t)count, method, holds, ids, &failed_at);
    Py_END_ALLOW_THREADS
    if (err) {
        result = Py_BuildValue("(in)", err, (Py_ssize_t)failed_at);
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++)
        PAGE(PyList_GetItem(pages, i))->id = ids[i];
    result = pages;
    pages = NULL;
done:
    while (exported)
        PyBuffer_Release(&views[--exported]);
    free(scratch);
    Py_XDECREF(pages); /* on failure: empty holds, nothing to let go of */
    return result;
}

static PyObject *page_release(PyObject *self, PyObject *unused)
{
    (void)unused;
    dp_page_release(&PAGE(self)->hold);
    Py_RETURN_NONE;
}

/* _drop(): let go of the record now, as death would (a builder discarded) */
static PyObject *page_drop_now(PyObject *self, PyObject *unused)
{
    (void)unused;
    dp_page_drop(&PAGE(self)->hold);
    Py_RETURN_NONE;
}

static PyObject *page_released(PyObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(dp_page_released(&PAGE(self)->hold));
}

/* the hold's address, for the calls made through cffi (ffi.cast): valid while the page is */
static PyObject *page_address(PyObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromVoidPtr(&PAGE(self)->hold);
}

static Py_ssize_t page_len(PyObject *self)
{
    return (Py_ssize_t)PAGE(self)->nbytes;
}

static PyMethodDef page_methods[] = {
    {"_new", (PyCFunction)(void (*)(void))page_new_empty, METH_FASTCALL | METH_CLASS, NULL},
    {"_write", (PyCFunction)(void (*)(void))page_write, METH_FASTCALL | METH_CLASS, NULL},
    {"_write_many", (PyCFunction)(void (*)(void))page_write_many, METH_FASTCALL | METH_CLASS,
     NULL},
    {"release", page_release, METH_NOARGS,
     "Give the page up now: reads fail from here on and its bytes go with the next batch "
     "(or ``cache.remove_released()``). Idempotent; safe from any thread."},
    {"_drop", page_drop_now, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef page_getset[] = {
    {"released", page_released, NULL,
     "True once ``release()`` ran, the cache closed, or the collector reclaimed this page "
     "(an object can outlive that: resurrection, gc.garbage); its bytes are then gone or "
     "going.",
     NULL},
    {"_address", page_address, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef page_members[] = {
    {"id", T_ULONGLONG, offsetof(PageObject, id), READONLY, "The page's id in its cache."},
    {"nbytes", T_ULONGLONG, offsetof(PageObject, nbytes), READONLY, "The page's size."},
    {"_id", T_ULONGLONG, offsetof(PageObject, id), 0, NULL},
    {"_nbytes", T_ULONGLONG, offsetof(PageObject, nbytes), 0, NULL},
    {"_cache", T_OBJECT_EX, offsetof(PageObject, cache), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot page_slots[] = {
    {Py_tp_doc, "A page's storage: its hold on the C record, its cache, its id and size."},
    {Py_tp_dealloc, page_dealloc},
    {Py_tp_finalize, page_finalize},
    {Py_tp_traverse, page_traverse},
    {Py_tp_methods, page_methods},
    {Py_tp_getset, page_getset},
    {Py_tp_members, page_members},
    {Py_sq_length, page_len},
    {0, NULL},
};

static PyType_Spec page_spec = {
    .name = "diskpages._native.PageBase",
    .basicsize = sizeof(PageObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = page_slots,
};

int dp_native_init(void)
{
    PyGILState_STATE gil = PyGILState_Ensure(); /* cffi let go of it for this call */
    int rc = -1;
    PyObject *module = PyImport_ImportModule("diskpages._native");
    if (module) {
        if (!page_type)
            page_type = (PyTypeObject *)PyType_FromSpec(&page_spec);
        if (page_type)
            rc = PyObject_SetAttrString(module, "PageBase", (PyObject *)page_type);
        Py_DECREF(module);
    }
    if (rc < 0)
        PyErr_Print(); /* the caller raises ImportError: say why first */
    PyGILState_Release(gil);
    return rc;
}
