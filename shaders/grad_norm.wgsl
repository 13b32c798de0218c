// grad_norm.wgsl — the global gradient norm and the clip factor it gives, on the device.
//
// Launcher: crates/tensor/src/ops/grad_norm.rs (CPU path beside it).
//
//   norm = √(Σ_k sq[k])                      sq[k] = Σ g_k², one slot per gradient tensor
//   clip = max_norm / (norm + 1e-6)  if norm > max_norm and norm is finite, else 1
//   out  = [norm, clip]
//
// The slots are added in order by one invocation (a few hundred at most: one per trainable
// tensor), so the result is deterministic. The AdamW kernel (`adamw.wgsl`, `adamw_step_clipped`)
// multiplies each gradient by out[1] as it reads it.
//
// Bindings: 0 params; 1 sq (n, read); 2 out (2, written). Workgroup: 1 invocation, 1 workgroup.

struct Params {
    n: u32,         // slots
    off_sq: u32,    // where slot 0 sits inside binding 1
    off_out: u32,   // where out[0] sits inside binding 2
    max_norm: f32,  // the clip limit (+inf: never clip)
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> sq: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(1)
fn grad_norm_clip() {
    var total = 0.0;
    for (var k = 0u; k < p.n; k = k + 1u) {
        total = total + sq[p.off_sq + k];
    }
    let norm = sqrt(total);
    // Finite: the exponent bits are not all ones (no isFinite in WGSL; x − x == 0 may be folded).
    let finite = (bitcast<u32>(norm) & 0x7f800000u) != 0x7f800000u;
    var clip = 1.0;
    if (finite && norm > p.max_norm) {
        clip = p.max_norm / (norm + 1e-6);
    }
    out[p.off_out] = norm;
    out[p.off_out + 1u] = clip;
}
