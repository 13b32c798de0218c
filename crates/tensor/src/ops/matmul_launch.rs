//! The GPU launch of a product: batch entries in batched dispatches, problems larger than one
//! storage binding cut into sub-blocks ([`launch_2d`]), each dispatch recorded with the kernel
//! the choice gives it ([`matmul_tiled::pick`], or the split-K pair of [`splitk`] for small
//! outputs with a long K), measured once per class of shapes on a hardware adapter
//! ([`matmul_tune`]). A product with an epilogue ([`Epilogue`]: GELU's, from
//! `matmul_gelu.rs`) binds its extra tensor in C's layout wherever C is bound, runs the
//! epilogue on the last K chunk only, and is never split along K by the split-K path.

use std::sync::Arc;

use super::{Dims, Epilogue, MatmulOpts, Params, TILE, splitk};
use crate::gpu::bind::View;
use crate::gpu::{Binding, GpuContext};
use crate::ops::matmul_tiled::{self, GpuMatmul};
use crate::ops::{matmul_coop, matmul_tune};
use crate::{Result, Tensor, reference};

/// The GPU path. Batch entries go in batched dispatches (workgroup z = batch entry), as many
/// per dispatch as `max_z` (65,535; tests pass a smaller one) and one binding per operand
/// allow: entries `z0..z0 + nz` of an operand span `(nz − 1)·stride + extent` elements from
/// entry z0's first (stride 0: one matrix shared by the batch). Where one entry does not fit
/// a binding, or the grid does not, each entry is a 2-D problem split by [`launch_2d`].
/// `epilogue`: the epilogue and its tensor, laid out as C (same offset, leading dimension and
/// batch stride inside it).
#[allow(clippy::too_many_arguments)]
pub(super) fn launch(
    ctx: &Arc<GpuContext>,
    c: &Tensor,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    d: &Dims,
    o: MatmulOpts,
    accumulate: bool,
    max_z: usize,
    epilogue: Option<(Epilogue, &Tensor)>,
) -> Result<()> {
    if d.batch == 0 || d.m == 0 || d.n == 0 {
        return Ok(());
    }
    let (stride, extent) = (d.per_batch(), d.extents(o));
    let max_groups = ctx.limits.max_compute_workgroups_per_dimension as usize;
    let align = ctx.limits.min_storage_buffer_offset_alignment as u64;
    let room = (ctx.max_binding_bytes().saturating_sub(align) / 4) as usize;
    let grid_fits = d.m.div_ceil(TILE) <= max_groups && d.n.div_ceil(TILE) <= max_groups;
    // Entries per dispatch: (nz − 1)·stride + extent ≤ room for every operand.
    let per = (0..3)
        .map(|i| match (extent[i] <= room, stride[i]) {
            (false, _) => 0,
            (true, 0) => usize::MAX,
            (true, s) => (room - extent[i]) / s + 1,
        })
        .min()
        .unwrap_or(0)
        .min(max_z);
    if d.batch == 1 || !grid_fits || per == 0 {
        let [oa, ob, oc] = d.off;
        let [pa, pb, pc] = stride;
        for z in 0..d.batch {
            launch_2d(
                ctx,
                [c, a, b],
                bias,
                [oa + z * pa, ob + z * pb, oc + z * pc],
                d,
                o,
                accumulate,
                epilogue,
            )?;
        }
        return Ok(());
    }
    for z0 in (0..d.batch).step_by(per) {
        let nz = per.min(d.batch - z0);
        let bind = |t, i: usize| {
            ctx.view(
                t,
                d.off[i] + z0 * stride[i],
                (nz - 1) * stride[i] + extent[i],
            )
        };
        let (av, bv, cv) = (bind(a, 0)?, bind(b, 1)?, bind(c, 2)?);
        let biasv = bias.map(|t| ctx.view_all(t)).transpose()?;
        let auxv = match epilogue {
            Some((e, t)) => Some((e, bind(t, 2)?)),
            None => None,
        };
        record(
            ctx,
            Params::new(d, o, accumulate),
            [av, bv, cv],
            biasv,
            auxv,
            nz,
            false,
        )?;
    }
    Ok(())
}

/// One 2-D product whose operands start at elements `base` = [A, B, C] of their tensors, cut into
/// sub-blocks so that every bound range fits one storage binding.
///
/// Each operand is stored as rows of `ld` elements: A's rows are M (K if `trans_a`), B's are K
/// (N if `trans_b`), C's are M. A chunk of `r` rows of an operand spans about `r·ld` elements, so
/// the chunk of that operand's row dimension is at most `room / ld`; an operand whose single row
/// is larger than a binding takes one row per chunk and cuts its columns instead. Sub-blocks of C
/// are addressed with `ldc = N`; K chunks after the first accumulate into C, the bias is
/// added by the first, and an epilogue is run by the last (on the whole sum).
#[allow(clippy::too_many_arguments)]
fn launch_2d(
    ctx: &Arc<GpuContext>,
    [c, a, b]: [&Tensor; 3],
    bias: Option<&Tensor>,
    base: [usize; 3],
    d: &Dims,
    o: MatmulOpts,
    accumulate: bool,
    epilogue: Option<(Epilogue, &Tensor)>,
) -> Result<()> {
    const M: usize = 0;
    const K: usize = 1;
    const N: usize = 2;
    let align = ctx.limits.min_storage_buffer_offset_alignment as u64;
    let room = (ctx.max_binding_bytes().saturating_sub(align) / 4).max(1) as usize;
    let [lda, ldb, ldc] = d.ld;
    // (stored-row dimension, stored-column dimension, ld) of A, B, C.
    let a_dims = if o.trans_a { (K, M, lda) } else { (M, K, lda) };
    let b_dims = if o.trans_b { (N, K, ldb) } else { (K, N, ldb) };
    let max_tiles = ctx.limits.max_compute_workgroups_per_dimension as usize * TILE;
    let mut chunk = [d.m.min(max_tiles), d.k, d.n.min(max_tiles)];
    for (row, col, ld) in [a_dims, b_dims, (M, N, ldc)] {
        if ld <= room {
            chunk[row] = chunk[row].min(room / ld.max(1));
        } else {
            chunk[row] = 1;
            chunk[col] = chunk[col].min(room);
        }
    }
    // Chunks in multiples of 4 where they can be, so that sub-blocks of operands the tiled
    // kernel reads as vec4s stay readable that way (`matmul_tiled::tiled_fits`).
    for c in &mut chunk {
        if *c >= 4 {
            *c -= *c % 4;
        }
    }
    let starts = |len: usize, step: usize| {
        (0..len.max(1))
            .step_by(step.max(1))
            .map(move |s| (s, step.min(len - s)))
    };
    // The bound range of rows r0.. (r rows) and columns c0.. (cols columns) of an operand.
    let span = |r0: usize, r: usize, c0: usize, cols: usize, ld: usize| {
        (r0 * ld + c0, r.saturating_sub(1) * ld + cols)
    };
    for (i0, mr) in starts(d.m, chunk[M]) {
        for (j0, nr) in starts(d.n, chunk[N]) {
            for (p0, kr) in starts(d.k, chunk[K]) {
                let first_k = p0 == 0;
                // With K = 0, A and B are empty and never read: bind their first element.
                let (sa, la) = match (kr, o.trans_a) {
                    (0, _) => (0, 0),
                    (_, true) => span(p0, kr, i0, mr, lda),
                    (_, false) => span(i0, mr, p0, kr, lda),
                };
                let (sb, lb) = match (kr, o.trans_b) {
                    (0, _) => (0, 0),
                    (_, true) => span(j0, nr, p0, kr, ldb),
                    (_, false) => span(p0, kr, j0, nr, ldb),
                };
                let (sc, lc) = span(i0, mr, j0, nr, ldc);
                let av = ctx.view(a, base[0] + sa, la)?;
                let bv = ctx.view(b, base[1] + sb, lb)?;
                let cv = ctx.view(c, base[2] + sc, lc)?;
                let biasv = match bias {
                    Some(t) if first_k => Some(ctx.view(t, j0, nr)?),
                    _ => None,
                };
                let auxv = match epilogue {
                    Some((e, t)) if p0 + kr == d.k => Some((e, ctx.view(t, base[2] + sc, lc)?)),
                    _ => None,
                };
                let params = Params {
                    m: mr as u32,
                    n: nr as u32,
                    k: kr as u32,
                    ..Params::new(d, o, accumulate || !first_k)
                };
                record(ctx, params, [av, bv, cv], biasv, auxv, 1, false)?;
            }
        }
    }
    Ok(())
}

/// The GPU product `C = X·op(W) [+ bias]` (or `C += X·op(W)`) with W a frozen weight in f16,
/// two elements per u32 word of `words` ([`matmul_f16`](crate::ops::matmul_f16)): X `(M, K)` and
/// C `(M, N)` whole tensors, cut into chunks of rows that each fit one binding; W is bound whole
/// (a weight larger than one binding is refused with the limit it exceeds). `op(W)` is W stored
/// `(K, N)`, or Wᵀ stored `(N, K)` with `trans_w`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_f16(
    ctx: &Arc<GpuContext>,
    c: &Tensor,
    x: &Tensor,
    words: &Tensor,
    bias: Option<&Tensor>,
    [m, k, n]: [usize; 3],
    trans_w: bool,
    accumulate: bool,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    for (i0, rows) in ctx.row_chunks(m, &[k, n])? {
        let xv = ctx.view(x, i0 * k, rows * k)?;
        let cv = ctx.view(c, i0 * n, rows * n)?;
        let wv = ctx.view_all(words)?;
        let biasv = bias.map(|t| ctx.view_all(t)).transpose()?;
        let p = Params {
            m: rows as u32,
            n: n as u32,
            k: k as u32,
            trans_b: trans_w.into(),
            lda: k as u32,
            ldb: (if trans_w { k } else { n }) as u32,
            ldc: n as u32,
            accumulate: accumulate.into(),
            alpha: 1.0,
            ..bytemuck::Zeroable::zeroed()
        };
        record(ctx, p, [xv, wv, cv], biasv, None, 1, true)?;
    }
    Ok(())
}

/// Record one dispatch over `nz` batch entries of `p`'s M×N product, with A, B, C, the bias and
/// an epilogue's tensor bound from these views; `b_f16`: B's words hold f16 pairs (its offset then counts f16
/// elements: twice the words before it).
fn record(
    ctx: &Arc<GpuContext>,
    mut p: Params,
    [a, b, c]: [View<'_>; 3],
    bias: Option<View<'_>>,
    aux: Option<(Epilogue, View<'_>)>,
    nz: usize,
    b_f16: bool,
) -> Result<()> {
    let off_b = if b_f16 { 2 * b.offset } else { b.offset };
    (p.off_a, p.off_b, p.off_c) = (a.offset, off_b, c.offset);
    p.off_aux = aux.as_ref().map_or(0, |(_, v)| v.offset);
    p.has_bias = bias.is_some().into();
    p.off_bias = bias.as_ref().map_or(0, |v| v.offset);
    let bias = bias.map_or(unread_bias(&a.binding), |v| v.binding);
    // An epilogue's tensor is a fifth binding (its entry point's); the plain product has four.
    let extra = aux.as_ref().map(|(e, v)| (e.binding(), v.binding));
    let all = [
        (1, a.binding),
        (2, b.binding),
        (3, c.binding),
        (4, bias),
        extra.unwrap_or((4, bias)),
    ];
    let bindings = &all[..4 + usize::from(extra.is_some())];
    let shape = matmul_tiled::Dispatch {
        m: p.m,
        n: p.n,
        k: p.k,
        trans_a: p.trans_a != 0,
        trans_b: p.trans_b != 0,
        ld: [p.lda, p.ldb, p.ldc],
        off: [p.off_a, p.off_b, p.off_c],
        stride: [p.stride_a, p.stride_b, p.stride_c],
        off_bias: (p.has_bias != 0).then_some(p.off_bias),
        b_f16,
        epilogue: aux.map(|(e, _)| (e, p.off_aux)),
    };
    let executes = !ctx.is_dry_run();
    let choice = match matmul_tiled::gpu_matmul() {
        GpuMatmul::Auto if executes && !ctx.is_software() => tune(ctx, &p, &shape, bindings, nz)?,
        GpuMatmul::Tune if executes => tune(ctx, &p, &shape, bindings, nz)?,
        choice => choice,
    };
    record_with(ctx, choice, &p, &shape, bindings, nz)
}

/// The split-K plan `choice` gives this dispatch ([`splitk::plan`]), under this device's grid
/// and binding limits.
fn split_plan(
    ctx: &GpuContext,
    choice: GpuMatmul,
    shape: &matmul_tiled::Dispatch,
    nz: usize,
) -> Option<splitk::Split> {
    // An epilogue needs the whole sum: a product with one is never split along K.
    if shape.epilogue.is_some() {
        return None;
    }
    let max_z = ctx.limits.max_compute_workgroups_per_dimension as usize;
    let room = (ctx.max_binding_bytes() / 4) as usize;
    splitk::plan(choice, shape, nz, max_z, room)
}

/// Record the product of `p` with the kernel `choice` gives it: the cooperative-matrix kernel
/// for `Coop` where the device has a configuration for the product ([`matmul_coop::record`];
/// the default rule's kernel where it has none), the split-K pair where [`split_plan`] splits it, else
/// one dispatch of the kernel [`matmul_tiled::pick`] gives.
fn record_with(
    ctx: &Arc<GpuContext>,
    choice: GpuMatmul,
    p: &Params,
    shape: &matmul_tiled::Dispatch,
    bindings: &[(u32, Binding<'_>)],
    nz: usize,
) -> Result<()> {
    // Forced or chosen, the cooperative-matrix kernel takes the products it has a
    // configuration for; the others (an f32 product on an adapter that lists only f16 ones)
    // take the default rule.
    let choice = match choice {
        GpuMatmul::Coop => match coop_config(ctx, shape.b_f16)? {
            Some(config) => {
                let p = bytemuck::bytes_of(p);
                return matmul_coop::record(ctx, config, p, shape, bindings, nz);
            }
            None => GpuMatmul::Auto,
        },
        other => other,
    };
    if let Some(split) = split_plan(ctx, choice, shape, nz)
        && let Ok(four) = bindings.try_into()
    {
        return splitk::record(ctx, p, four, nz, split, shape.b_f16);
    }
    let (kernel, constants, tile) = matmul_tiled::pick(choice, shape);
    let groups = [p.n.div_ceil(tile), p.m.div_ceil(tile), nz as u32];
    ctx.dispatch_with(kernel, constants, bytemuck::bytes_of(p), bindings, groups)
}

/// Binding 4 of a product without a bias: the first vec4 of A's range, never read
/// (`has_bias` = 0), and not A's whole range again, which the step accounting would count as
/// bound twice.
fn unread_bias<'a>(a: &Binding<'a>) -> Binding<'a> {
    Binding {
        buffer: a.buffer,
        offset: a.offset,
        size: a.size.min(16),
    }
}

/// The cooperative-matrix configuration a product with B in f16 (`b_f16`) or f32 takes on this
/// device ([`CoopSupport::config_for`](matmul_coop::CoopSupport::config_for)), once it has passed
/// its self-check ([`coop_self_check`], run here at its first use; not in a dry run, where
/// nothing executes).
fn coop_config(ctx: &Arc<GpuContext>, b_f16: bool) -> Result<Option<matmul_coop::CoopConfig>> {
    let Some(config) = ctx.coop().config_for(b_f16) else {
        return Ok(None);
    };
    if ctx.is_dry_run() {
        return Ok(Some(config));
    }
    let slot = ctx.coop().check(config);
    if slot.get().is_none() {
        let verdict = coop_self_check(ctx, config)?;
        let _ = slot.set(verdict);
    }
    Ok(slot.get().and_then(|v| v.is_none().then_some(config)))
}

/// Run `config` on two products whose every value and partial sum is exact in f16 and f32
/// (multiples of 1/8 up to 6/8, K = 83, shapes that are multiples of neither the fragment nor
/// the 32×32 tile; one with B transposed) and compare with the exact result: `None` when every
/// element is equal, else what differed. The kernel has run on few drivers; this is what keeps
/// one that miscomputes it from being chosen.
fn coop_self_check(
    ctx: &Arc<GpuContext>,
    config: matmul_coop::CoopConfig,
) -> Result<Option<String>> {
    use crate::ops::matmul_f16::F16Tensor;
    let (m, k, n) = (67usize, 83usize, 45usize);
    let device = crate::Device::Gpu(ctx.clone());
    let value = |i: usize, p: usize, q: usize| ((i * p) % q) as f32 / 8.0 - 0.625;
    let a: Vec<f32> = (0..m * k).map(|i| value(i, 7, 11)).collect();
    let b_f16 = config != matmul_coop::CoopConfig::F32;
    for trans_b in [false, true] {
        let b: Vec<f32> = (0..k * n).map(|i| value(i, 5, 12)).collect();
        let opts = MatmulOpts {
            trans_a: false,
            trans_b,
        };
        let want = reference::narrow(&reference::matmul(
            &reference::widen(&a),
            &reference::widen(&b),
            None,
            [1, m, k, n],
            opts,
        ));
        let stored = if trans_b { [n, k] } else { [k, n] };
        let at = Tensor::from_vec(a.clone(), &[m, k], &device)?;
        let bt = match b_f16 {
            true => F16Tensor::from_f32("coop self-check", &b, &stored, &device)?
                .words
                .clone(),
            false => Tensor::from_vec(b.clone(), &stored, &device)?,
        };
        let c = Tensor::zeros(&[m, n], &device)?;
        let (av, bv, cv) = (ctx.view_all(&at)?, ctx.view_all(&bt)?, ctx.view_all(&c)?);
        let p = Params {
            m: m as u32,
            n: n as u32,
            k: k as u32,
            trans_b: trans_b.into(),
            lda: k as u32,
            ldb: (if trans_b { k } else { n }) as u32,
            ldc: n as u32,
            off_a: av.offset,
            off_b: if b_f16 { 2 * bv.offset } else { bv.offset },
            off_c: cv.offset,
            alpha: 1.0,
            ..bytemuck::Zeroable::zeroed()
        };
        let shape = matmul_tiled::Dispatch {
            m: p.m,
            n: p.n,
            k: p.k,
            trans_a: false,
            trans_b,
            ld: [p.lda, p.ldb, p.ldc],
            off: [p.off_a, p.off_b, p.off_c],
            stride: [0; 3],
            off_bias: None,
            b_f16,
            epilogue: None,
        };
        let spare = unread_bias(&av.binding);
        let bindings = [
            (1, av.binding),
            (2, bv.binding),
            (3, cv.binding),
            (4, spare),
        ];
        matmul_coop::record(ctx, config, bytemuck::bytes_of(&p), &shape, &bindings, 1)?;
        let got = c.to_vec()?;
        if let Some(e) = (0..m * n).find(|&e| got[e] != want[e]) {
            return Ok(Some(format!(
                "a {m}×{k}×{n} product{} gave {} at ({}, {}) where {} is exact",
                if trans_b { " with B transposed" } else { "" },
                got[e],
                e / n,
                e % n,
                want[e]
            )));
        }
    }
    Ok(None)
}

/// The measured kernel for this product's class ([`matmul_tune`]): the candidates (split-K
/// among them where its rule splits this product) run it into a scratch copy of C's bound
/// range, so C itself is written once, by the caller (a GELU epilogue's g is written by each
/// run too; the caller's dispatch, recorded after them, writes it last).
fn tune(
    ctx: &Arc<GpuContext>,
    p: &Params,
    shape: &matmul_tiled::Dispatch,
    bindings: &[(u32, Binding<'_>)],
    nz: usize,
) -> Result<GpuMatmul> {
    let c = &bindings[2].1;
    let scratch = ctx.alloc(c.size.div_ceil(16) * 16)?;
    let scratch_c = Binding {
        buffer: &scratch,
        offset: 0,
        size: c.size,
    };
    let mut with_scratch = bindings.to_vec();
    with_scratch[2] = (3, scratch_c);
    let split = split_plan(ctx, GpuMatmul::Auto, shape, nz).is_some();
    let coop = coop_config(ctx, shape.b_f16)?.is_some();
    let chosen = matmul_tune::tuned(ctx, shape, split, coop, |k| {
        record_with(ctx, k, p, shape, &with_scratch, nz)
    });
    ctx.release(scratch);
    chosen
}
