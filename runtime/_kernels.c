/* runtime._kernels: one image's float input quantized, its pixels looked up, and its 8-bit output turned into
 * probabilities, each in one pass (runtime/load.py). Optional: a plain install without a C compiler goes without it, and load.py does
 * the same work in numpy, with the same results.
 *
 * Every argument is checked (type, item format, contiguity, length): a wrong one raises TypeError or ValueError.
 * An input these kernels do not take (for quantize: outside the table's range, NaN; for each: not a C-contiguous
 * buffer of the expected items) makes them return False, and the caller takes the general path, which refuses
 * or saturates it with the reason.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

/* The struct format character of a buffer's items ('B' when it gives none), past a native-order prefix. */
static char item_format(const Py_buffer *view)
{
    const char *f = view->format ? view->format : "B";
    if (f[0] == '@' || f[0] == '=') {
        f++;
    }
    return (f[0] != '\0' && f[1] == '\0') ? f[0] : '?';
}

/* A C-contiguous buffer of float32 ("f") or 8-bit ("8": int8 or uint8) items; 0 on success, else -1 with an
 * exception set. With `soft`, an object that gives no such buffer (not C-contiguous, other items) gives -2 and no
 * exception: the caller's general path takes it. */
static int get_buffer(PyObject *obj, Py_buffer *view, const char *kind, int writable, int soft, const char *what)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        if (soft) { /* numpy refuses a layout that is not C-contiguous with ValueError, others BufferError */
            PyErr_Clear();
            return -2;
        }
        return -1;
    }
    char f = item_format(view);
    int ok = kind[0] == 'f' ? (f == 'f' && view->itemsize == 4) : ((f == 'b' || f == 'B') && view->itemsize == 1);
    if (!ok && soft) {
        PyBuffer_Release(view);
        return -2;
    }
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s: expected %s items, got format '%s' of %zd byte(s)", what,
                     kind[0] == 'f' ? "float32" : "int8 or uint8", view->format ? view->format : "B",
                     view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(quantize_doc,
"quantize(constants, x, out) -> bool\n\n"
"out = clip(rint(x / scale) + zero_point, low, high) for float32 x, into int8 or uint8 out of the same length,\n"
"rounding half to even, the quotient divided in float32. constants: float32 (scale, first, last, zero_point,\n"
"low, high). True when every rounded quotient is within [first, last]; False, with out unspecified, when one is\n"
"not (NaN and infinities included), or x is not a C-contiguous buffer of native float32.");

static PyObject *quantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "quantize takes (constants, x, out)");
        return NULL;
    }
    Py_buffer c, x, out;
    if (get_buffer(args[0], &c, "f", 0, 0, "constants") < 0) {
        return NULL;
    }
    if (c.len != 6 * 4) {
        PyBuffer_Release(&c);
        PyErr_SetString(PyExc_ValueError, "constants: expected 6 float32 values");
        return NULL;
    }
    int got = get_buffer(args[1], &x, "f", 0, 1, "x");
    if (got < 0) {
        PyBuffer_Release(&c);
        if (got == -2) {
            Py_RETURN_FALSE;
        }
        return NULL;
    }
    if (get_buffer(args[2], &out, "8", 1, 0, "out") < 0) {
        PyBuffer_Release(&x);
        PyBuffer_Release(&c);
        return NULL;
    }
    if (out.len != x.len / 4) {
        PyErr_Format(PyExc_ValueError, "out holds %zd values; x holds %zd", out.len, x.len / 4);
        PyBuffer_Release(&out);
        PyBuffer_Release(&x);
        PyBuffer_Release(&c);
        return NULL;
    }
    const float *k = (const float *)c.buf;
    const float scale = k[0], first = k[1], last = k[2], zero = k[3], low = k[4], high = k[5];
    const float *v = (const float *)x.buf;
    const Py_ssize_t n = out.len;
    const float rounder = 12582912.0f; /* 1.5 * 2**23: q + rounder - rounder is q rounded half to even, |q| < 2**22 */
    int ok = 1;
    /* plain loops of comparisons and selects, which the compiler vectorizes; no libm call per value */
    if (item_format(&out) == 'b') {
        int8_t *o = (int8_t *)out.buf;
        for (Py_ssize_t i = 0; i < n; i++) {
            float r = (v[i] / scale + rounder) - rounder;
            ok &= (r >= first) & (r <= last); /* false for NaN */
            float q = r + zero;
            q = q >= low ? q : low; /* NaN becomes low: no NaN reaches the conversion to int */
            q = q <= high ? q : high;
            o[i] = (int8_t)(int)q;
        }
    } else {
        uint8_t *o = (uint8_t *)out.buf;
        for (Py_ssize_t i = 0; i < n; i++) {
            float r = (v[i] / scale + rounder) - rounder;
            ok &= (r >= first) & (r <= last);
            float q = r + zero;
            q = q >= low ? q : low; /* NaN becomes low: no NaN reaches the conversion to int */
            q = q <= high ? q : high;
            o[i] = (uint8_t)(int)q;
        }
    }
    PyBuffer_Release(&out);
    PyBuffer_Release(&x);
    PyBuffer_Release(&c);
    return PyBool_FromLong(ok);
}

PyDoc_STRVAR(softmax_doc,
"softmax(table, raw, out) -> bool\n\n"
"out[i] = table[raw[i]] / sum(table[raw]) for one row of 8-bit raw output (an int8 -k is byte 256 - k), the sum\n"
"taken in float64 as Python's sum() takes it, then rounded to float32. table: 256 float32 exps of the\n"
"dequantized values; out: float32 of raw's length. False, with out untouched, when raw is not a C-contiguous\n"
"buffer of 8-bit values.");

static PyObject *softmax(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "softmax takes (table, raw, out)");
        return NULL;
    }
    Py_buffer t, raw, out;
    if (get_buffer(args[0], &t, "f", 0, 0, "table") < 0) {
        return NULL;
    }
    if (t.len != 256 * 4) {
        PyBuffer_Release(&t);
        PyErr_SetString(PyExc_ValueError, "table: expected 256 float32 values");
        return NULL;
    }
    int got = get_buffer(args[1], &raw, "8", 0, 1, "raw");
    if (got < 0) {
        PyBuffer_Release(&t);
        if (got == -2) {
            Py_RETURN_FALSE;
        }
        return NULL;
    }
    if (get_buffer(args[2], &out, "f", 1, 0, "out") < 0) {
        PyBuffer_Release(&raw);
        PyBuffer_Release(&t);
        return NULL;
    }
    if (out.len / 4 != raw.len) {
        PyErr_Format(PyExc_ValueError, "out holds %zd values; raw holds %zd", out.len / 4, raw.len);
        PyBuffer_Release(&out);
        PyBuffer_Release(&raw);
        PyBuffer_Release(&t);
        return NULL;
    }
    const float *table = (const float *)t.buf;
    const uint8_t *r = (const uint8_t *)raw.buf;
    float *o = (float *)out.buf;
    /* the sum as Python's sum() of these floats takes it (load.py's numpy path does), so both paths give the same
     * bits: from 3.12 Neumaier's compensated sum, before it a plain one */
    double total = 0.0;
#if PY_VERSION_HEX >= 0x030C0000
    double lost = 0.0;
    for (Py_ssize_t i = 0; i < raw.len; i++) {
        o[i] = table[r[i]];
        double x = (double)o[i], t = total + x;
        lost += fabs(total) >= fabs(x) ? (total - t) + x : (x - t) + total;
        total = t;
    }
    if (lost != 0.0 && isfinite(lost)) {
        total += lost;
    }
#else
    for (Py_ssize_t i = 0; i < raw.len; i++) {
        o[i] = table[r[i]];
        total += (double)o[i];
    }
#endif
    const float sum = (float)total;
    for (Py_ssize_t i = 0; i < raw.len; i++) {
        o[i] = o[i] / sum;
    }
    PyBuffer_Release(&out);
    PyBuffer_Release(&raw);
    PyBuffer_Release(&t);
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(lookup_doc,
"lookup(table, pixels, out) -> bool\n\n"
"out[i] = table[pixels[i]]: uint8 pixels through a table of 256 8-bit values (preprocessing and quantization\n"
"in one), into out of the pixels' length. False, with out untouched, when pixels is not a C-contiguous buffer\n"
"of uint8.");

static PyObject *lookup(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "lookup takes (table, pixels, out)");
        return NULL;
    }
    Py_buffer t, px, out;
    if (get_buffer(args[0], &t, "8", 0, 0, "table") < 0) {
        return NULL;
    }
    if (t.len != 256) {
        PyBuffer_Release(&t);
        PyErr_SetString(PyExc_ValueError, "table: expected 256 values");
        return NULL;
    }
    int got = get_buffer(args[1], &px, "8", 0, 1, "pixels");
    if (got == 0 && item_format(&px) != 'B') {
        PyBuffer_Release(&px);
        got = -2;
    }
    if (got < 0) {
        PyBuffer_Release(&t);
        if (got == -2) {
            Py_RETURN_FALSE;
        }
        return NULL;
    }
    if (get_buffer(args[2], &out, "8", 1, 0, "out") < 0) {
        PyBuffer_Release(&px);
        PyBuffer_Release(&t);
        return NULL;
    }
    if (out.len != px.len) {
        PyErr_Format(PyExc_ValueError, "out holds %zd values; pixels hold %zd", out.len, px.len);
        PyBuffer_Release(&out);
        PyBuffer_Release(&px);
        PyBuffer_Release(&t);
        return NULL;
    }
    const uint8_t *table = (const uint8_t *)t.buf, *p = (const uint8_t *)px.buf;
    uint8_t *o = (uint8_t *)out.buf;
    for (Py_ssize_t i = 0; i < px.len; i++) {
        o[i] = table[p[i]];
    }
    PyBuffer_Release(&out);
    PyBuffer_Release(&px);
    PyBuffer_Release(&t);
    Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"quantize", (PyCFunction)(void (*)(void))quantize, METH_FASTCALL, quantize_doc},
    {"softmax", (PyCFunction)(void (*)(void))softmax, METH_FASTCALL, softmax_doc},
    {"lookup", (PyCFunction)(void (*)(void))lookup, METH_FASTCALL, lookup_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "runtime._kernels",
    "One image's float input quantized, its pixels looked up, its 8-bit output made probabilities: one pass each.", -1, methods,
};

PyMODINIT_FUNC PyInit__kernels(void)
{
    return PyModule_Create(&module);
}
