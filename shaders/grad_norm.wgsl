// grad_norm.wgsl — the global gradient norm, the clip factor it gives and the step's finite
// check, on the device.
//
// Launcher: crates/tensor/src/ops/grad_norm.rs (CPU path beside it).
//
//   norm = √(Σ_{k<n} sq[k])                  sq[k] = Σ g_k², one slot per gradient tensor
//   clip = max_norm / (norm + 1e-6)  if norm > max_norm and norm is finite, else 1
//   ok   = 1 if norm and every checked value sq[n .. n + n_checked] are finite, else 0
//   out  = [norm, clip, ok, sq[n], …, sq[n + n_checked − 1]]
//
// The slots are added in order by one invocation (a few hundred at most: one per trainable
// tensor), so the result is deterministic. The checked values (the step's loss) are copied to
// the output so that one readback brings back all a step reports. The AdamW kernel
// (`adamw.wgsl`, `adamw_step_clipped`) multiplies each gradient by out[1] as it reads it and
// changes nothing unless out[2] is exactly 1 (an "ok" flag rather than a "skip" flag: a value
// never written, such as a NaN-poisoned buffer, then skips the update instead of taking it).
//
// `sum_squares` fills slots beforehand, one per workgroup: workgroup w writes
//   sq[w] = Σ g[i]²   over i in [w·span, min((w + 1)·span, n)),
// invocation l adding g[w·span + l]², g[w·span + l + 256]², … in order, then a tree over the
// invocations (`workgroup_sum`). One workgroup with span = n gives a tensor's whole Σ g²; a
// long gradient (a whole gradient arena) takes ⌈n / span⌉ workgroups in one dispatch, and
// `grad_norm_clip` adds their slots. For it binding 1 is the gradient (n elements from off_sq)
// and binding 2 the slots (off_out on).
//
// Bindings: 0 params; 1 sq (n + n_checked, read); 2 out (3 + n_checked, written).
// Workgroup (`grad_norm_clip`): one of 64 invocations, of which invocation 0 does the work (a
// few thousand adds in order at most) and the others return at once.

struct Params {
    n: u32,          // gradient slots
    n_checked: u32,  // values after them that are only checked and copied
    off_sq: u32,     // where slot 0 sits inside binding 1
    off_out: u32,    // where out[0] sits inside binding 2
    max_norm: f32,   // the clip limit (+inf: never clip)
    span: u32,       // `sum_squares`: elements per workgroup
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> sq: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

// Not inf or NaN: the exponent bits are not all ones (WGSL has no isFinite, and x − x == 0
// may be folded away by a compiler).
fn is_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

@compute @workgroup_size(256)
fn sum_squares(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let start = wg.x * p.span;
    let end = min(start + p.span, p.n);
    var acc = 0.0;
    for (var i = start + li; i < end; i = i + WG) {
        let x = sq[p.off_sq + i];
        acc = acc + x * x;
    }
    let total = workgroup_sum(li, acc);
    if (li == 0u) {
        out[p.off_out + wg.x] = total;
    }
}

@compute @workgroup_size(64)
fn grad_norm_clip(@builtin(local_invocation_index) li: u32) {
    if (li != 0u) { return; }
    var total = 0.0;
    for (var k = 0u; k < p.n; k = k + 1u) {
        total = total + sq[p.off_sq + k];
    }
    let norm = sqrt(total);
    let finite = is_finite(norm);
    var clip = 1.0;
    if (finite && norm > p.max_norm) {
        clip = p.max_norm / (norm + 1e-6);
    }
    var ok = finite;
    for (var k = 0u; k < p.n_checked; k = k + 1u) {
        let x = sq[p.off_sq + p.n + k];
        ok = ok && is_finite(x);
        out[p.off_out + 3u + k] = x;
    }
    out[p.off_out] = norm;
    out[p.off_out + 1u] = clip;
    out[p.off_out + 2u] = select(0.0, 1.0, ok);
}
