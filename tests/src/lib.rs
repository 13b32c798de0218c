//! Cross-crate integration and parity tests live in `tests/tests/*.rs`; this library holds what
//! they share: reading the PyTorch fixtures and comparing tensors llm.c-style.

use std::path::{Path, PathBuf};

/// `tests/fixtures/<name>` of this repository.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Compare `got` with `want` (f64 reference) at |g − w| ≤ atol + rtol·|w|; print the first five
/// pairs, the largest difference and OK / NOT OK, like llm.c's `check_tensor`. Returns OK.
pub fn check_tensor(name: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) -> bool {
    assert_eq!(got.len(), want.len(), "{name}: lengths differ");
    let mut max = 0.0f64;
    let mut ok = true;
    for (&g, &w) in got.iter().zip(want) {
        let d = (g as f64 - w).abs();
        max = max.max(d);
        if d > atol + rtol * w.abs() || g.is_nan() {
            ok = false;
        }
    }
    let first: Vec<String> = got
        .iter()
        .zip(want)
        .take(5)
        .map(|(g, w)| format!("{g:.6}/{w:.6}"))
        .collect();
    println!(
        "{:<44} {} maxdiff {max:.2e}  [{}]",
        name,
        if ok { "OK    " } else { "NOT OK" },
        first.join(", ")
    );
    ok
}
