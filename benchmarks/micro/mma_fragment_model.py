# Checks, on CPU, the lane/fragment index arithmetic of SyncMmaTile (cuda/kernels/common.cuh,
# branch wip/mma-sync) against a model of ldmatrix and mma.sync built from the PTX ISA definitions.
# python3 benchmarks/micro/mma_fragment_model.py  (prints the max |C - A B| per layout; ~1e-14)
# Model of SyncMmaTile::compute/store (common.cuh) from the PTX ISA's fragment and ldmatrix
# definitions; checks C = A B for every layout, 16-bit and TF32, on the kernels' tile shapes.
import numpy as np
rng = np.random.default_rng(0)

def ldsm(mem, addrs, es, trans):
    # addrs[l]: element index of the row start given by lane l (lanes 8q..8q+7 -> matrix q rows).
    # Each matrix: 8 rows x 16 bytes. Lane l gets word (row l//4, word l%4) of each matrix
    # (.trans: of the transposed 8x8 b16 matrix).
    out = np.zeros((32, 4), dtype=object)
    per_word = 4 // es  # elements per 32-bit word (2 for b16, 1 for fp32)
    for q in range(4):
        rows = [addrs[8 * q + r] for r in range(8)]
        if es == 2:
            M = np.array([[mem[rows[r] + c] for c in range(8)] for r in range(8)], dtype=object)
            if trans: M = M.T
            for l in range(32):
                out[l, q] = (M[l // 4, 2 * (l % 4)], M[l // 4, 2 * (l % 4) + 1])
        else:
            assert not trans
            M = np.array([[mem[rows[r] + c] for c in range(4)] for r in range(8)], dtype=object)
            for l in range(32):
                out[l, q] = (M[l // 4, l % 4],)
    return out

def simulate(BM, BN, BK, WM, WN, A_COL, B_COL, tf32):
    ES = 4 if tf32 else 2; KK = 8 if tf32 else 16
    TM, TN = BM // WM, BN // WN; FM, FN = TM // 16, TN // 8
    pad = 16 // ES
    lda = (BM if A_COL else BK) + pad; ldb = (BK if B_COL else BN) + pad
    A = rng.normal(size=(BM, BK)); B = rng.normal(size=(BK, BN))
    As = {}; Bs = {}
    for m in range(BM):
        for k in range(BK):
            As[(k * lda + m) if A_COL else (m * lda + k)] = A[m, k]
    for k in range(BK):
        for n in range(BN):
            Bs[(n * ldb + k) if B_COL else (k * ldb + n)] = B[k, n]
    C = np.zeros((BM, BN))
    for warp in range(WM * WN):
        m0, n0 = (warp // WN) * TM, (warp % WN) * TN
        acc = np.zeros((FM, FN, 32, 4))
        for k in range(0, BK, KK):
            a = [[None] * 32 for _ in range(FM)]; b = [[None] * 32 for _ in range(FN)]
            for i in range(FM):
                mb = m0 + i * 16
                if not A_COL:
                    addrs = [(mb + (l & 15)) * lda + k + (l >> 4) * (4 if tf32 else 8) for l in range(32)]
                    frag = ldsm(As, addrs, ES, False)
                    for l in range(32): a[i][l] = [w for q in range(4) for w in frag[l, q]]
                elif not tf32:
                    addrs = [(k + (l & 7) + ((l >> 3) >> 1) * 8) * lda + mb + ((l >> 3) & 1) * 8 for l in range(32)]
                    frag = ldsm(As, addrs, ES, True)
                    for l in range(32): a[i][l] = [w for q in range(4) for w in frag[l, q]]
                else:
                    for l in range(32):
                        g, t = l >> 2, l & 3
                        a[i][l] = [As[(k + t) * lda + mb + g], As[(k + t) * lda + mb + g + 8],
                                   As[(k + t + 4) * lda + mb + g], As[(k + t + 4) * lda + mb + g + 8]]
            for j in range(0, FN, 2):
                nb = n0 + j * 8
                if B_COL:
                    addrs = [(nb + (l & 7) + ((l >> 3) >> 1) * 8) * ldb + k + ((l >> 3) & 1) * (4 if tf32 else 8) for l in range(32)]
                    frag = ldsm(Bs, addrs, ES, False)
                    for l in range(32):
                        b[j][l] = [w for q in (0, 1) for w in frag[l, q]]; b[j + 1][l] = [w for q in (2, 3) for w in frag[l, q]]
                elif not tf32:
                    addrs = [(k + (l & 7) + ((l >> 3) & 1) * 8) * ldb + nb + ((l >> 3) >> 1) * 8 for l in range(32)]
                    frag = ldsm(Bs, addrs, ES, True)
                    for l in range(32):
                        b[j][l] = [w for q in (0, 1) for w in frag[l, q]]; b[j + 1][l] = [w for q in (2, 3) for w in frag[l, q]]
                else:
                    for h in range(2):
                        for l in range(32):
                            g, t = l >> 2, l & 3
                            b[j + h][l] = [Bs[(k + t) * ldb + nb + h * 8 + g], Bs[(k + t + 4) * ldb + nb + h * 8 + g]]
            # mma per PTX: rebuild the 16xKK A tile and KKx8 B tile from the lanes' fragments.
            for i in range(FM):
                for j in range(FN):
                    Af = np.full((16, KK), np.nan); Bf = np.full((KK, 8), np.nan)
                    for l in range(32):
                        g, t = l >> 2, l & 3
                        if tf32:
                            for e, (r, c) in enumerate([(g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4)]): Af[r, c] = a[i][l][e]
                            for e, r in enumerate([t, t + 4]): Bf[r, g] = b[j][l][e]
                        else:
                            for e in range(8):
                                r = g + 8 * ((e >> 1) & 1); c = 2 * t + (e & 1) + 8 * (e >> 2)
                                Af[r, c] = a[i][l][e]
                            for e in range(4):
                                Bf[2 * t + (e & 1) + 8 * (e >> 1), g] = b[j][l][e]
                    assert not np.isnan(Af).any() and not np.isnan(Bf).any()
                    D = Af @ Bf
                    for l in range(32):
                        g, t = l >> 2, l & 3
                        acc[i, j, l] += [D[g, 2 * t], D[g, 2 * t + 1], D[g + 8, 2 * t], D[g + 8, 2 * t + 1]]
        for i in range(FM):
            for j in range(FN):
                for l in range(32):
                    g, t = l >> 2, l & 3
                    r0, c0 = m0 + i * 16 + g, n0 + j * 8 + 2 * t
                    C[r0, c0], C[r0, c0 + 1], C[r0 + 8, c0], C[r0 + 8, c0 + 1] = acc[i, j, l]
    err = np.abs(C - A @ B).max()
    return err

for (BM, BN, WM, WN) in [(64, 64, 2, 2), (128, 64, 2, 2), (128, 128, 4, 2)]:
    for A_COL in (False, True):
        for B_COL in (False, True):
            for tf32 in (False, True):
                e = simulate(BM, BN, 32, WM, WN, A_COL, B_COL, tf32)
                print(BM, BN, WM, WN, "A_COL" if A_COL else "A_ROW", "B_COL" if B_COL else "B_ROW", "tf32" if tf32 else "b16", f"{e:.1e}")
