/* CSV rows from columns of text, for `report.csv.arrow_csv_parts`, called through ctypes.
 *
 * Each column is an Arrow large_string without nulls: int64 offsets into a data buffer. A row is
 * its fields joined by ',' and ended by "\r\n"; a field of a quoted column that holds a comma, a
 * double quote, CR or LF is written in double quotes with its quotes doubled (Python's csv module,
 * QUOTE_MINIMAL: what pandas' `to_csv` writes). One pass over the text finds the fields to quote
 * and each row's size; a second writes each row where the caller's order puts it. This replaces Arrow's
 * per-column quoting, its join of all columns and the take of the joined rows: three copies.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { PLAIN = 0, QUOTED = 1, QUOTED_WITH_QUOTES = 2 };

/* Fields at least this long are searched with memchr (vectorised in libc), shorter ones byte by byte. */
enum { LONG_FIELD = 32 };

static inline uint8_t field_kind(const char *text, int64_t length)
{
    if (length >= LONG_FIELD) {
        if (memchr(text, '"', (size_t)length))
            return QUOTED_WITH_QUOTES;
        return memchr(text, ',', (size_t)length) || memchr(text, '\n', (size_t)length)
               || memchr(text, '\r', (size_t)length) ? QUOTED : PLAIN;
    }
    uint8_t kind = PLAIN;
    for (int64_t i = 0; i < length; i++) {
        const char c = text[i];
        if (c == '"')
            return QUOTED_WITH_QUOTES;
        if (c == ',' || c == '\n' || c == '\r')
            kind = QUOTED;
    }
    return kind;
}

/* memcpy of a short field without the call: most fields are a few bytes long. */
static inline char *copy(char *at, const char *text, int64_t length)
{
    if (length >= LONG_FIELD) {
        memcpy(at, text, (size_t)length);
        return at + length;
    }
    for (; length >= 8; length -= 8, at += 8, text += 8)
        memcpy(at, text, 8);
    for (; length > 0; length--)
        *at++ = *text++;
    return at;
}

/* Pass 1: the bytes of each row, into row_bytes[0..n_rows); kinds: n_rows * n_cols bytes
 * (row-major), written for every quoted column's fields. */
void csv_rows_size(int64_t n_rows, int64_t n_cols, const uint64_t *offsets, const uint64_t *data,
                   const uint8_t *quote_column, uint8_t *kinds, int64_t *row_bytes)
{
    for (int64_t r = 0; r < n_rows; r++)
        row_bytes[r] = n_cols + 1;                               /* separators and "\r\n" */
    for (int64_t c = 0; c < n_cols; c++) {
        const int64_t *off = (const int64_t *)offsets[c];
        const char *text = (const char *)data[c];
        for (int64_t r = 0; r < n_rows; r++) {
            const int64_t start = off[r], length = off[r + 1] - start;
            row_bytes[r] += length;
            if (!quote_column[c])
                continue;
            const uint8_t kind = field_kind(text + start, length);
            kinds[r * n_cols + c] = kind;
            if (kind != PLAIN) {
                row_bytes[r] += 2;
                if (kind == QUOTED_WITH_QUOTES)
                    for (int64_t i = 0; i < length; i++)
                        row_bytes[r] += text[start + i] == '"';
            }
        }
    }
}

/* Pass 2: each row r with start[r] >= 0 into out + start[r] (the caller lays the rows out in its
 * order); the rows are read in table order, so the columns are read front to back. Returns the bytes
 * written. */
int64_t csv_rows_write(int64_t n_rows, int64_t n_cols, const uint64_t *offsets, const uint64_t *data,
                       const uint8_t *quote_column, const uint8_t *kinds, const int64_t *start, char *out)
{
    int64_t written = 0;
    for (int64_t r = 0; r < n_rows; r++) {
        if (start[r] < 0)
            continue;
        char *const row = out + start[r];
        char *at = row;
        for (int64_t c = 0; c < n_cols; c++) {
            const int64_t *off = (const int64_t *)offsets[c];
            const char *text = (const char *)data[c] + off[r];
            const int64_t length = off[r + 1] - off[r];
            const uint8_t kind = quote_column[c] ? kinds[r * n_cols + c] : PLAIN;
            if (kind == PLAIN) {
                at = copy(at, text, length);
            } else {
                *at++ = '"';
                if (kind == QUOTED) {
                    at = copy(at, text, length);
                } else {
                    for (int64_t k = 0; k < length; k++) {
                        if (text[k] == '"')
                            *at++ = '"';
                        *at++ = text[k];
                    }
                }
                *at++ = '"';
            }
            *at++ = c + 1 < n_cols ? ',' : '\r';
        }
        *at++ = '\n';
        written += at - row;
    }
    return written;
}

/* An importable (empty) module, so that the build and the import system treat the file as the
 * package's own extension; the code above is reached through ctypes. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_csv_rows", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__csv_rows(void) { return PyModule_Create(&module); }
