/* The isolation forest's tree walk for `detect.forest.HeapTrees`, called through ctypes.
 *
 * Every tree is stored as a complete binary tree of `depth` levels in heap order (the children of
 * split i are 2i+1 and 2i+2), so a step needs no child pointers and no branch:
 *     i = 2i + 1 + (x > threshold)
 * A leaf above the last level is a split whose whole subtree ends in copies of that leaf.
 * Thresholds are float32, rounded down from sklearn's float64 ones: for a float32 x,
 * x <= round_down(t) exactly when (double)x <= t, sklearn's test. 16 rows walk each tree side by
 * side (their steps do not depend on each other, so the CPU overlaps them); trees are taken in
 * order and each row's leaf values are summed in that order, as sklearn sums them: the same
 * floats, bit for bit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

enum { ROWS_SIDE_BY_SIDE = 16 };

static inline __attribute__((always_inline)) int32_t
step(const float *row, const float *threshold, const int32_t *feature, const uint8_t *missing_right,
     const int has_nan, int32_t i)
{
    const float v = row[feature[i]];
    int32_t right = !(v <= threshold[i]);
    if (has_nan && v != v)                 /* NaN: the side the split sends missing values to */
        right = missing_right[i];
    return 2 * i + 1 + right;
}

/* One tree over all rows (inlined twice: with and without the NaN test). */
static inline __attribute__((always_inline)) void
walk_tree(const float *x, int64_t n, int64_t width, const float *th, const int32_t *fe, const uint8_t *mr,
          const int has_nan, const double *lf, int32_t depth, double *depths)
{
    int64_t r = 0;
    for (; r + ROWS_SIDE_BY_SIDE <= n; r += ROWS_SIDE_BY_SIDE) {
        const float *rows = x + r * width;
        int32_t at[ROWS_SIDE_BY_SIDE] = {0};
        for (int32_t d = 0; d < depth; d++)
            for (int k = 0; k < ROWS_SIDE_BY_SIDE; k++)
                at[k] = step(rows + k * width, th, fe, mr, has_nan, at[k]);
        for (int k = 0; k < ROWS_SIDE_BY_SIDE; k++)
            depths[r + k] += lf[at[k]];
    }
    for (; r < n; r++) {
        int32_t at = 0;
        for (int32_t d = 0; d < depth; d++)
            at = step(x + r * width, th, fe, mr, has_nan, at);
        depths[r] += lf[at];
    }
}

/* depths[r] += the leaf value of row r in every tree, trees in order.
 * x: n rows of `width` float32, C order. threshold, feature, missing_right: n_trees * (2^depth - 1)
 * splits. leaf: n_trees * 2^depth values. missing_right may be NULL when x holds no NaN. */
void heap_walk(const float *x, int64_t n, int64_t width, const float *threshold, const int32_t *feature,
               const uint8_t *missing_right, const double *leaf, int64_t n_trees, int32_t depth,
               double *depths)
{
    const int64_t splits = ((int64_t)1 << depth) - 1, leaves = (int64_t)1 << depth;
    for (int64_t t = 0; t < n_trees; t++) {
        const float *th = threshold + t * splits;
        const int32_t *fe = feature + t * splits;
        const double *lf = leaf + t * leaves - splits;    /* indexed by the last level's heap position */
        if (missing_right)
            walk_tree(x, n, width, th, fe, missing_right + t * splits, 1, lf, depth, depths);
        else
            walk_tree(x, n, width, th, fe, NULL, 0, lf, depth, depths);
    }
}

/* An importable (empty) module, so that the build and the import system treat the file as the
 * package's own extension; the code above is reached through ctypes. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_heap_walk", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__heap_walk(void) { return PyModule_Create(&module); }
