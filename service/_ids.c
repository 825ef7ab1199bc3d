/* POST /score's candidate list, validated and converted in one pass: [{"item_id": int, "category_id": int}, ...]
 * -> two int64 buffers, or None for anything else (service/schemas.py then validates with pydantic, whose errors
 * name the fields).
 *
 * The same rule as the pure-Python version in service/schemas.py (`_candidate_arrays`), which runs where this module
 * was not built: a non-empty list of dicts (exactly dict) with exactly the two keys, whose values are Python ints
 * (exactly int: not bool) within 0..max_item and 0..max_category. Python's per-candidate loop costs ~0.05 ms for 100
 * candidates warm, and 3-5x that with the caches cold after a scoring call, as on every request
 * (docs/performance.md, round 9); this loop is a few microseconds.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static PyObject *key_item, *key_category;

/* The int's value if it is an exact int in 0..max, else -1. */
static int64_t checked(PyObject *value, int64_t max) {
    if (value == NULL || !PyLong_CheckExact(value)) return -1;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow || v < 0 || v > max) return -1;
    return (int64_t)v;
}

static PyObject *candidate_ids(PyObject *self, PyObject *args) {
    PyObject *list;
    long long max_item, max_category;
    if (!PyArg_ParseTuple(args, "OLL", &list, &max_item, &max_category)) return NULL;
    if (!PyList_CheckExact(list) || PyList_GET_SIZE(list) == 0) Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(list);
    PyObject *items = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(int64_t));
    PyObject *cates = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(int64_t));
    if (items == NULL || cates == NULL) goto fail;
    int64_t *item_out = (int64_t *)PyBytes_AS_STRING(items), *cate_out = (int64_t *)PyBytes_AS_STRING(cates);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *candidate = PyList_GET_ITEM(list, i);
        if (!PyDict_CheckExact(candidate) || PyDict_GET_SIZE(candidate) != 2) goto none;
        /* Borrowed references; NULL when missing (the keys are str, so a lookup cannot raise). */
        int64_t item = checked(PyDict_GetItemWithError(candidate, key_item), max_item);
        int64_t cate = checked(PyDict_GetItemWithError(candidate, key_category), max_category);
        if (PyErr_Occurred()) goto fail;
        if (item < 0 || cate < 0) goto none;
        item_out[i] = item;
        cate_out[i] = cate;
    }
    return Py_BuildValue("(NN)", items, cates);
none:
    Py_DECREF(items);
    Py_DECREF(cates);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(items);
    Py_XDECREF(cates);
    return NULL;
}

static PyMethodDef methods[] = {
    {"candidate_ids", candidate_ids, METH_VARARGS,
     "candidate_ids(candidates, max_item, max_category) -> (item_ids, category_ids) as int64 bytes, or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ids", "POST /score's candidate list in one pass.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__ids(void) {
    key_item = PyUnicode_InternFromString("item_id");
    key_category = PyUnicode_InternFromString("category_id");
    if (key_item == NULL || key_category == NULL) return NULL;
    return PyModule_Create(&module);
}
