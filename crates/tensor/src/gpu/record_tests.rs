//! The recording path on a real device: each dispatch reads its own `Params` through its dynamic
//! offset, within a batch and across batches, and bind groups are reused, then let go with the
//! pool's buffers.

use std::sync::Arc;

use super::{Binding, GpuContext, GpuOptions, Kernel, MAX_BATCH};
use crate::{Device, Tensor, testing};

/// `out[p.i] = p.value`: one element per dispatch, so each dispatch's Params show in `out`.
const STORE: Kernel = Kernel {
    shader: "record_test_store",
    source: "struct Params { i: u32, value: f32, pad0: u32, pad1: u32 }
        @group(0) @binding(0) var<uniform> p: Params;
        @group(0) @binding(1) var<storage, read_write> out: array<f32>;
        @compute @workgroup_size(1)
        fn store() { out[p.i] = p.value; }",
    entry: "store",
};

/// A context of its own, so that the cache's counters are this test's alone.
fn own() -> Option<Arc<GpuContext>> {
    testing::gpu()?;
    match Device::gpu_with(&GpuOptions {
        allow_software: true,
        ..Default::default()
    }) {
        Ok(Device::Gpu(ctx)) => Some(ctx),
        other => panic!("a GPU was found a moment ago, now: {other:?}"),
    }
}

fn store(ctx: &GpuContext, out: &Tensor, i: u32, value: f32) {
    let params: [u32; 4] = [i, value.to_bits(), 0, 0];
    let binding = Binding {
        buffer: out.gpu_buffer().unwrap(),
        offset: 0,
        size: out.bytes(),
    };
    ctx.dispatch(
        STORE,
        bytemuck::bytes_of(&params),
        &[(1, binding)],
        [1, 1, 1],
    )
    .unwrap();
}

#[test]
fn every_dispatch_reads_its_own_params_within_and_across_batches() {
    let Some(ctx) = own() else {
        return;
    };
    let device = Device::Gpu(ctx.clone());
    // More dispatches than one batch holds, so the arena is refilled by a second batch.
    let n = MAX_BATCH as usize + 37;
    let out = Tensor::zeros(&[n], &device).unwrap();
    for i in 0..n {
        store(&ctx, &out, i as u32, i as f32 * 0.5 + 1.0);
    }
    let expected: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 + 1.0).collect();
    assert_eq!(out.to_vec().unwrap(), expected);
}

#[test]
fn a_bind_group_is_made_once_per_ranges_and_let_go_with_the_pool() {
    let Some(ctx) = own() else {
        return;
    };
    let device = Device::Gpu(ctx.clone());
    let a = Tensor::zeros(&[4], &device).unwrap();
    let b = Tensor::zeros(&[4], &device).unwrap();
    let (_, _, misses_before) = ctx.bind_group_cache();
    store(&ctx, &a, 0, 1.0);
    store(&ctx, &a, 1, 2.0);
    store(&ctx, &b, 0, 3.0);
    store(&ctx, &a, 2, 3.0);
    let (held, _, misses) = ctx.bind_group_cache();
    assert_eq!(misses - misses_before, 2, "one bind group for a, one for b");
    assert!(held >= 2);
    assert_eq!(a.to_vec().unwrap(), vec![1.0, 2.0, 3.0, 0.0]);
    assert_eq!(b.to_vec().unwrap(), vec![3.0, 0.0, 0.0, 0.0]);
    drop((a, b));
    ctx.trim_pool();
    assert_eq!(
        ctx.bind_group_cache().0,
        0,
        "the pool's buffers are not kept alive"
    );
}
