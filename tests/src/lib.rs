//! Cross-crate integration and parity tests live in `tests/tests/*.rs`; this library holds what
//! the tests of every crate share (the crates' integration tests take it as a dev-dependency):
//! reading the PyTorch fixtures and comparing tensors llm.c-style (here), the `gpt2-tiny`
//! fixture and its AdamW steps ([`gpt2_tiny`]), scratch directories removed when dropped
//! ([`scratch`]), and the loaders' fuzz harness ([`hostile`]).

use std::path::{Path, PathBuf};

pub mod gpt2_tiny;
pub mod hostile;
mod scratch;

pub use scratch::{Scratch, scratch};

/// The repository's root directory.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `tests/fixtures/<name>` of this repository.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// The f64 tensors of a safetensors file of PyTorch-made expectations (`expected.safetensors`).
pub fn read_f64(path: &Path) -> Vec<(String, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::F64)
        .map(|(name, v)| {
            let data = v
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, data)
        })
        .collect()
}

/// The tensor called `name`, or a panic that says how to regenerate the fixture.
pub fn get<'a>(tensors: &'a [(String, Vec<f64>)], name: &str) -> &'a [f64] {
    &tensors
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| {
            panic!("fixture lacks `{name}`: re-run tests/fixtures/gpt2-tiny/make_fixture.py")
        })
        .1
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
