/* runtime.backends.kernels: one image's float input quantized, its pixels looked up (into 8-bit input, or float input in
 * either layout), and its output turned into probabilities, each in one pass (runtime/load.py). Optional: a plain install without a C compiler goes
 * without it, and load.py does the same work in numpy, with the same results.
 *
 * Each kernel takes (table, input, out). Every argument is checked (type, item format, contiguity, length): a
 * wrong table or out raises TypeError, ValueError or BufferError. An input a kernel does not take (for
 * quantize: a value outside the table's range, NaN; for each: not a C-contiguous buffer of the expected items)
 * makes it return False, and the caller takes the general path, which refuses or saturates it with the reason.
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

/* A C-contiguous buffer of float32 (kind 'f') or 8-bit (kind '8': int8 or uint8) items; 0 on success, else -1
 * with an exception set. With `soft`, an object that gives no such buffer (not C-contiguous, other items)
 * gives -2 and no exception: the caller's general path takes it. */
static int get_buffer(PyObject *obj, Py_buffer *view, char kind, int writable, int soft, const char *what)
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
    int ok = kind == 'f' ? (f == 'f' && view->itemsize == 4) : ((f == 'b' || f == 'B') && view->itemsize == 1);
    if (ok) {
        return 0;
    }
    if (!soft) {
        PyErr_Format(PyExc_TypeError, "%s: expected %s items, got format '%s' of %zd byte(s)", what,
                     kind == 'f' ? "float32" : "int8 or uint8", view->format ? view->format : "B",
                     view->itemsize);
    }
    PyBuffer_Release(view);
    return soft ? -2 : -1;
}

static void release(Py_buffer *views, int n)
{
    while (n-- > 0) {
        PyBuffer_Release(&views[n]);
    }
}

/* The three buffers of a kernel call into b: the table (`kinds[0]`, exactly `table_items` items), the input
 * (`kinds[1]`, and item format `input_format` unless it is 0) and out (`kinds[2]`, writable, as many items as
 * the input). 1: all three held; 0: the input is not one the kernel takes (nothing held, no exception); -1: an
 * exception is set (nothing held). */
static int get_arguments(PyObject *const *args, Py_ssize_t nargs, const char *name, const char kinds[3],
                         Py_ssize_t table_items, char input_format, Py_buffer b[3])
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "%s takes (table, input, out); got %zd argument(s)", name, nargs);
        return -1;
    }
    if (get_buffer(args[0], &b[0], kinds[0], 0, 0, "table") < 0) {
        return -1;
    }
    if (b[0].len / b[0].itemsize != table_items) {
        PyErr_Format(PyExc_ValueError, "%s: the table holds %zd values; expected %zd", name,
                     b[0].len / b[0].itemsize, table_items);
        release(b, 1);
        return -1;
    }
    int got = get_buffer(args[1], &b[1], kinds[1], 0, 1, "input");
    if (got == 0 && input_format && item_format(&b[1]) != input_format) {
        PyBuffer_Release(&b[1]);
        got = -2;
    }
    if (got < 0) {
        release(b, 1);
        return got == -2 ? 0 : -1;
    }
    if (get_buffer(args[2], &b[2], kinds[2], 1, 0, "out") < 0) {
        release(b, 2);
        return -1;
    }
    Py_ssize_t n = b[1].len / b[1].itemsize, m = b[2].len / b[2].itemsize;
    if (m != n) {
        PyErr_Format(PyExc_ValueError, "%s: out holds %zd values; the input holds %zd", name, m, n);
        release(b, 3);
        return -1;
    }
    return 1;
}

/* The constants of quantize, read once into locals (an 8-bit output may alias anything in C, so values read
 * through a pointer would be read again after every store). */
typedef struct {
    float scale, first, last, zero, low, high;
} Constants;

/* round(v / scale) + zero saturated to [low, high], as a float holding an integer; NaN gives low (no NaN
 * reaches a conversion to int); *ok cleared when the rounded quotient is outside [first, last]. Comparisons
 * and selects only: the loops that call it vectorize. */
static inline float quantized(float v, Constants c, int *ok)
{
    const float rounder = 12582912.0f; /* 1.5 * 2**23: q + rounder - rounder is q rounded half to even */
    float r = (v / c.scale + rounder) - rounder;
    *ok &= (r >= c.first) & (r <= c.last); /* false for NaN; |first|, |last| < 2**21, where rounding is exact */
    float q = r + c.zero;
    q = q >= c.low ? q : c.low;
    return q <= c.high ? q : c.high;
}

PyDoc_STRVAR(quantize_doc,
"quantize(constants, x, out) -> bool\n\n"
"out = clip(rint(x / scale) + zero_point, low, high) for float32 x, into int8 or uint8 out of the same length,\n"
"rounding half to even, the quotient divided in float32. constants: float32 (scale, first, last, zero_point,\n"
"low, high). True when every rounded quotient is within [first, last]; False, with out unspecified, when one is\n"
"not (NaN and infinities included), or x is not a C-contiguous buffer of native float32.");

static PyObject *quantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer b[3];
    int got = get_arguments(args, nargs, "quantize", "ff8", 6, 0, b);
    if (got <= 0) {
        return got == 0 ? Py_NewRef(Py_False) : NULL;
    }
    const float *k = (const float *)b[0].buf, *x = (const float *)b[1].buf;
    const Constants c = {k[0], k[1], k[2], k[3], k[4], k[5]};
    const Py_ssize_t n = b[2].len;
    int ok = 1;
    if (item_format(&b[2]) == 'b') {
        int8_t *out = (int8_t *)b[2].buf;
        for (Py_ssize_t i = 0; i < n; i++) {
            out[i] = (int8_t)(int)quantized(x[i], c, &ok);
        }
    } else {
        uint8_t *out = (uint8_t *)b[2].buf;
        for (Py_ssize_t i = 0; i < n; i++) {
            out[i] = (uint8_t)(int)quantized(x[i], c, &ok);
        }
    }
    release(b, 3);
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
    Py_buffer b[3];
    int got = get_arguments(args, nargs, "softmax", "f8f", 256, 0, b);
    if (got <= 0) {
        return got == 0 ? Py_NewRef(Py_False) : NULL;
    }
    const float *table = (const float *)b[0].buf;
    const uint8_t *raw = (const uint8_t *)b[1].buf;
    float *out = (float *)b[2].buf;
    const Py_ssize_t n = b[1].len;
    /* the sum as Python's sum() of these floats takes it (load.py's numpy path does), so both paths give the same
     * bits: from 3.12 Neumaier's compensated sum, before it a plain one */
    double total = 0.0;
#if PY_VERSION_HEX >= 0x030C0000
    double lost = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = table[raw[i]];
        double v = (double)out[i], t = total + v;
        lost += fabs(total) >= fabs(v) ? (total - t) + v : (v - t) + total;
        total = t;
    }
    if (lost != 0.0 && isfinite(lost)) {
        total += lost;
    }
#else
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = table[raw[i]];
        total += (double)out[i];
    }
#endif
    const float sum = (float)total;
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = out[i] / sum;
    }
    release(b, 3);
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(lookup_doc,
"lookup(table, pixels, out) -> bool\n\n"
"out[i] = table[pixels[i]]: uint8 pixels through a table of 256 8-bit values (preprocessing and quantization\n"
"in one), into out of the pixels' length. False, with out untouched, when pixels is not a C-contiguous buffer\n"
"of uint8.");

static PyObject *lookup(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer b[3];
    int got = get_arguments(args, nargs, "lookup", "888", 256, 'B', b);
    if (got <= 0) {
        return got == 0 ? Py_NewRef(Py_False) : NULL;
    }
    const uint8_t *table = (const uint8_t *)b[0].buf, *pixels = (const uint8_t *)b[1].buf;
    uint8_t *out = (uint8_t *)b[2].buf;
    for (Py_ssize_t i = 0; i < b[1].len; i++) {
        out[i] = table[pixels[i]];
    }
    release(b, 3);
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(pixels_doc,
"pixels(table, pixels, out, channels, planar) -> bool\n\n"
"Float model input from one image's uint8 pixels (H, W, C), C = channels: out = table[pixel], each channel by\n"
"its own column when the table holds 256 x C float32 values (per-channel mean and std), else all by one of 256.\n"
"planar: out is channels first (C, H, W), as an NCHW model takes it; else (H, W, C). out: float32 of the pixels'\n"
"length. False, with out untouched, when pixels is not a C-contiguous buffer of uint8.");

static PyObject *pixels(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "pixels takes (table, pixels, out, channels, planar); got %zd argument(s)",
                     nargs);
        return NULL;
    }
    Py_ssize_t c = PyLong_AsSsize_t(args[3]);
    int planar = PyObject_IsTrue(args[4]);
    if ((c == -1 && PyErr_Occurred()) || planar < 0) {
        return NULL;
    }
    if (c < 1 || c > 4) {
        PyErr_Format(PyExc_ValueError, "pixels: channels must be 1 to 4; got %zd", c);
        return NULL;
    }
    Py_buffer b[3];
    if (get_buffer(args[0], &b[0], 'f', 0, 0, "table") < 0) {
        return NULL;
    }
    Py_ssize_t columns = b[0].len / 4 / 256;
    if (b[0].len != 256 * 4 * columns || (columns != 1 && columns != c)) {
        PyErr_Format(PyExc_ValueError, "pixels: the table holds %zd values; expected 256 or 256 x %zd",
                     b[0].len / 4, c);
        release(b, 1);
        return NULL;
    }
    int got = get_buffer(args[1], &b[1], '8', 0, 1, "pixels");
    if (got == 0 && item_format(&b[1]) != 'B') {
        PyBuffer_Release(&b[1]);
        got = -2;
    }
    if (got < 0) {
        release(b, 1);
        return got == -2 ? Py_NewRef(Py_False) : NULL;
    }
    if (get_buffer(args[2], &b[2], 'f', 1, 0, "out") < 0) {
        release(b, 2);
        return NULL;
    }
    const Py_ssize_t n = b[1].len, hw = n / c;
    if (b[2].len / 4 != n || hw * c != n) {
        PyErr_Format(PyExc_ValueError, "pixels: out holds %zd values for %zd pixels of %zd channel(s)", b[2].len / 4,
                     n, c);
        release(b, 3);
        return NULL;
    }
    const float *table = (const float *)b[0].buf;
    const uint8_t *in = (const uint8_t *)b[1].buf;
    float *out = (float *)b[2].buf;
    if (c == 1) {
        for (Py_ssize_t i = 0; i < n; i++) {
            out[i] = table[in[i]];
        }
    }
    else {
        for (Py_ssize_t i = 0; i < hw; i++) {
            for (Py_ssize_t k = 0; k < c; k++) {
                float v = table[columns == 1 ? in[i * c + k] : in[i * c + k] * columns + k];
                out[planar ? k * hw + i : i * c + k] = v;
            }
        }
    }
    release(b, 3);
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(softmax_float_doc,
"softmax_float(logits, out) -> bool\n\n"
"out = exp(z - max z) / sum(exp(z - max z)) for one row of float32 logits, into float32 out of the same length:\n"
"each exp taken in double and rounded to float32, the sum in double. False, with out unspecified, when a logit\n"
"is not finite or logits is not a C-contiguous buffer of float32 (the caller's numpy path then says why).");

static PyObject *softmax_float(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "softmax_float takes (logits, out); got %zd argument(s)", nargs);
        return NULL;
    }
    Py_buffer b[2];
    int got = get_buffer(args[0], &b[0], 'f', 0, 1, "logits");
    if (got < 0) {
        return got == -2 ? Py_NewRef(Py_False) : NULL;
    }
    if (get_buffer(args[1], &b[1], 'f', 1, 0, "out") < 0) {
        release(b, 1);
        return NULL;
    }
    const Py_ssize_t n = b[0].len / 4;
    if (b[1].len / 4 != n || n < 1) {
        PyErr_Format(PyExc_ValueError, "softmax_float: out holds %zd values; the logits %zd", b[1].len / 4, n);
        release(b, 2);
        return NULL;
    }
    const float *z = (const float *)b[0].buf;
    float *out = (float *)b[1].buf;
    float top = z[0];
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!isfinite(z[i])) {
            release(b, 2);
            Py_RETURN_FALSE;
        }
        top = z[i] > top ? z[i] : top;
    }
    double total = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = (float)exp((double)(z[i] - top));
        total += (double)out[i];
    }
    const float sum = (float)total;
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = out[i] / sum;
    }
    release(b, 2);
    Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"quantize", (PyCFunction)(void (*)(void))quantize, METH_FASTCALL, quantize_doc},
    {"softmax", (PyCFunction)(void (*)(void))softmax, METH_FASTCALL, softmax_doc},
    {"lookup", (PyCFunction)(void (*)(void))lookup, METH_FASTCALL, lookup_doc},
    {"pixels", (PyCFunction)(void (*)(void))pixels, METH_FASTCALL, pixels_doc},
    {"softmax_float", (PyCFunction)(void (*)(void))softmax_float, METH_FASTCALL, softmax_float_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "runtime.backends.kernels",
    "One image's float input quantized, its pixels looked up, its 8-bit output made probabilities: one pass each.", -1,
    methods,
};

PyMODINIT_FUNC PyInit_kernels(void)
{
    return PyModule_Create(&module);
}
