use std::time::Instant;
fn t<F: FnMut()>(name: &str, flops: f64, mut f: F) {
    f();
    let mut best = f64::MAX;
    for _ in 0..5 { let s = Instant::now(); f(); best = best.min(s.elapsed().as_secs_f64()); }
    println!("{name:40} {:7.2} ms {:6.1} GFLOP/s", best * 1e3, flops / best / 1e9);
}
fn main() {
    let (n, c, v) = (400usize, 128usize, 50257usize);
    let x: Vec<f32> = (0..n * c).map(|i| (i % 13) as f32 * 0.1).collect();
    let w: Vec<f32> = (0..v * c).map(|i| (i % 7) as f32 * 0.1).collect();
    let mut logits = vec![0f32; n * v];
    let mut dx = vec![0f32; n * c];
    let fl = 2.0 * (n * c * v) as f64;
    unsafe {
        // logits = x · wᵀ : (n×c)·(c×v), w row-major (v×c) so B[k][j] = w[j*c+k]: rsb=1, csb=c
        t("logits x·wT", fl, || matrixmultiply::sgemm(n, c, v, 1.0, x.as_ptr(), c as isize, 1, w.as_ptr(), 1, c as isize, 0.0, logits.as_mut_ptr(), v as isize, 1));
        t("dx = G·w", fl, || matrixmultiply::sgemm(n, v, c, 1.0, logits.as_ptr(), v as isize, 1, w.as_ptr(), c as isize, 1, 0.0, dx.as_mut_ptr(), c as isize, 1));
        // chunked over vocab
        for chunk in [1024usize, 4096, 16384] {
            t(&format!("logits chunked {chunk}"), fl, || {
                let mut j = 0; while j < v { let vc = chunk.min(v - j);
                    matrixmultiply::sgemm(n, c, vc, 1.0, x.as_ptr(), c as isize, 1, w.as_ptr().add(j * c), 1, c as isize, 0.0, logits.as_mut_ptr().add(j), v as isize, 1); j += vc; } });
            t(&format!("dx chunked {chunk}"), fl, || {
                let mut j = 0; while j < v { let vc = chunk.min(v - j);
                    matrixmultiply::sgemm(n, vc, c, 1.0, logits.as_ptr().add(j), v as isize, 1, w.as_ptr().add(j * c), c as isize, 1, if j == 0 {0.0} else {1.0}, dx.as_mut_ptr(), c as isize, 1); j += vc; } });
        }
        // row chunks
        for rc in [32usize, 64, 128] {
            t(&format!("logits rowchunk {rc}"), fl, || {
                let mut i = 0; while i < n { let r = rc.min(n - i);
                    matrixmultiply::sgemm(r, c, v, 1.0, x.as_ptr().add(i * c), c as isize, 1, w.as_ptr(), 1, c as isize, 0.0, logits.as_mut_ptr().add(i * v), v as isize, 1); i += r; } });
        }
        let sq = 1024usize; let a = vec![0.5f32; sq*sq]; let mut o = vec![0f32; sq*sq];
        t("square 1024", 2.0 * (sq*sq*sq) as f64, || matrixmultiply::sgemm(sq, sq, sq, 1.0, a.as_ptr(), sq as isize, 1, a.as_ptr(), sq as isize, 1, 0.0, o.as_mut_ptr(), sq as isize, 1));
    }
}
