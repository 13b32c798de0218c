//! The step accounting of `tensor::counts`: exact FLOPs, bytes, ops, dispatches, submissions
//! and waits of small known programs, on the CPU and on the GPU, executed and dry-run.

use std::sync::Mutex;

use tensor::counts::{self, Counts};
use tensor::ops::elementwise::add;
use tensor::ops::matmul::{MatmulOpts, matmul};
use tensor::{Device, GpuOptions, Tensor, profile};

/// Counting is process-wide state: the tests of this file take turns.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A GPU context of its own (no NaN poisoning, which would add fills), executed or dry-run;
/// `None` where the tests' GPU is skipped.
fn own_gpu(dry_run: bool) -> Option<Device> {
    tensor::testing::gpu()?;
    Some(
        Device::gpu_with(&GpuOptions {
            allow_software: true,
            dry_run,
            ..Default::default()
        })
        .expect("a GPU adapter was found a moment ago"),
    )
}

fn counted(f: impl FnOnce()) -> Counts {
    counts::start();
    f();
    counts::stop()
}

#[test]
fn a_batched_matmul_counts_its_flops_by_shape_and_one_op_in_its_context() {
    let _s = serial();
    let cpu = Device::cpu();
    let (batch, m, k, n) = (2, 3, 4, 5);
    let a = Tensor::full(&[batch, m, k], 1.0, &cpu).unwrap();
    let b = Tensor::full(&[batch, k, n], 1.0, &cpu).unwrap();
    let c = counted(|| {
        let _phase = profile::phase("forward");
        let _attention = profile::scope("attention");
        matmul(&a, &b, None, MatmulOpts::default()).unwrap();
    });
    assert_eq!(c.matmuls.len(), 1, "{c:?}");
    let mm = &c.matmuls[0];
    assert_eq!(
        (mm.batch, mm.m, mm.n, mm.k, mm.trans_a, mm.trans_b),
        (batch, m, n, k, false, false)
    );
    assert_eq!(mm.flops, 2 * (batch * m * n * k) as u64);
    assert_eq!((mm.at.phase, mm.at.scope), ("forward", "attention"));
    // The innermost scope is the op; the `attention` scope around it is not one.
    assert_eq!(c.ops.len(), 1, "{c:?}");
    assert_eq!((c.ops[0].family, c.ops[0].calls), ("matmul", 1));
    assert_eq!(
        (c.ops[0].at.phase, c.ops[0].at.scope),
        ("forward", "attention")
    );
    // The CPU records no dispatch, submission or wait.
    assert_eq!(
        (c.dispatch_calls(), c.submissions, c.wait_calls()),
        (0, 0, 0)
    );
}

#[test]
fn a_shared_weight_is_folded_into_rows_and_nothing_is_counted_when_off() {
    let _s = serial();
    let cpu = Device::cpu();
    let x = Tensor::full(&[2, 3, 4], 1.0, &cpu).unwrap();
    let w = Tensor::full(&[5, 4], 1.0, &cpu).unwrap();
    let opts = MatmulOpts {
        trans_b: true,
        ..Default::default()
    };
    let c = counted(|| {
        matmul(&x, &w, None, opts).unwrap();
    });
    let mm = &c.matmuls[0];
    assert_eq!((mm.batch, mm.m, mm.n, mm.k, mm.trans_b), (1, 6, 5, 4, true));
    assert_eq!(c.matmul_flops(), 2 * 6 * 5 * 4);
    // Off: the same work leaves the next count empty.
    matmul(&x, &w, None, opts).unwrap();
    let empty = counted(|| {});
    assert_eq!(empty, Counts::default());
}

/// One GPU matmul: one dispatch of 64×64 tiles, its bound ranges (A, B, C and, in the bias
/// slot, which an unbiased product fills with the first vec4 of A, 16 bytes) and C as the only
/// writable one.
#[test]
fn a_gpu_matmul_counts_one_dispatch_with_its_bytes_and_workgroups() {
    let _s = serial();
    let Some(gpu) = own_gpu(false) else {
        return;
    };
    let (m, k, n) = (64usize, 32usize, 16usize);
    let a = Tensor::full(&[m, k], 1.0, &gpu).unwrap();
    let b = Tensor::full(&[k, n], 1.0, &gpu).unwrap();
    gpu.sync().unwrap();
    let mut out = None;
    let c = counted(|| out = Some(matmul(&a, &b, None, MatmulOpts::default()).unwrap()));
    assert_eq!(c.dispatches.len(), 1, "{c:?}");
    let d = &c.dispatches[0];
    assert_eq!(d.kernel, "matmul::matmul");
    assert_eq!(d.calls, 1);
    let groups = (m.div_ceil(64) * n.div_ceil(64)) as u64;
    assert_eq!(d.workgroups, groups);
    assert_eq!(d.invocations, groups * 16 * 16);
    let (ab, bb, cb) = ((m * k * 4) as u64, (k * n * 4) as u64, (m * n * 4) as u64);
    assert_eq!(d.bytes_bound, ab + bb + cb + 16);
    assert_eq!(d.bytes_writable, cb);
    assert_eq!(c.matmul_flops(), 2 * (m * n * k) as u64);
    // Nothing was submitted or waited for yet; reading the product back is one of each.
    assert_eq!((c.submissions, c.wait_calls()), (0, 0));
    let out = out.unwrap();
    let c = counted(|| {
        assert_eq!(out.to_vec().unwrap(), vec![k as f32; m * n]);
    });
    assert_eq!((c.submissions, c.wait_calls()), (1, 1), "{c:?}");
    assert_eq!(c.waits[0].what, "readback");
    assert_eq!(c.waits[0].bytes, cb);
}

/// The same small program on an executed and on a dry-run context: the same counts, but the
/// dry run's kernels never ran (its readback is 1.0 everywhere, not the sum).
#[test]
fn a_dry_run_counts_what_an_executed_run_counts_without_running_it() {
    let _s = serial();
    let (Some(real), Some(dry)) = (own_gpu(false), own_gpu(true)) else {
        return;
    };
    let program = |device: &Device| {
        let mut read = Vec::new();
        let c = counted(|| {
            let x = Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3], device).unwrap();
            let y = add(&x, &x).unwrap();
            device.sync().unwrap();
            read = y.to_vec().unwrap();
        });
        (c, read)
    };
    let (executed, values) = program(&real);
    assert_eq!(values, [2.0, 4.0, 6.0]);
    let (dry_counts, dry_values) = program(&dry);
    assert_eq!(dry_values, [1.0, 1.0, 1.0], "a dry run does not execute");
    // Host nanoseconds differ from run to run; everything else is the same.
    let strip = |mut c: Counts| {
        c.dispatches.iter_mut().for_each(|d| d.host_ns = 0);
        c
    };
    assert_eq!(strip(executed.clone()), strip(dry_counts));
    assert_eq!(executed.dispatch_calls(), 1);
    assert_eq!(executed.dispatches[0].kernel, "elementwise::add");
    assert_eq!(executed.transfer("upload"), (1, 12));
    assert_eq!(executed.submissions, 2, "the sync's and the readback's");
    let waits: Vec<_> = executed.waits.iter().map(|w| (w.what, w.calls)).collect();
    assert_eq!(waits, [("readback", 1), ("sync", 1)]);
    assert_eq!(
        executed.ops.iter().map(|o| o.family).collect::<Vec<_>>(),
        ["elementwise"]
    );
}

/// Memory by phase: the live bytes when a phase first allocates, and its peak.
#[test]
fn each_phase_records_the_live_bytes_at_its_start_and_its_peak() {
    let _s = serial();
    let cpu = Device::cpu();
    let before = cpu.memory().live;
    let mut kept = Vec::new();
    let c = counted(|| {
        {
            let _p = profile::phase("forward");
            kept.push(Tensor::zeros(&[1000], &cpu).unwrap());
        }
        let _p = profile::phase("backward");
        let temporary = Tensor::zeros(&[250], &cpu).unwrap();
        drop(temporary);
        kept.push(Tensor::zeros(&[500], &cpu).unwrap());
    });
    let phases: Vec<_> = c
        .memory
        .iter()
        .map(|m| (m.phase, m.live_at_start - before, m.peak - before))
        .collect();
    assert_eq!(
        phases,
        [("forward", 0, 4000), ("backward", 4000, 4000 + 2000)],
        "the temporary of 1000 bytes was freed before the 2000 were allocated"
    );
}

/// The held peak counts the GPU pool's cached buffers with the live tensors: a freed buffer of
/// another size stays held while the next tensor is allocated.
#[test]
fn the_held_peak_counts_buffers_the_pool_keeps() {
    let _s = serial();
    let Some(gpu) = own_gpu(true) else {
        return;
    };
    let (small, large) = (1usize << 18, 1usize << 19); // floats: 1 MiB, 2 MiB
    let c = counted(|| {
        let a = Tensor::zeros(&[small], &gpu).unwrap();
        drop(a);
        let _b = Tensor::zeros(&[large], &gpu).unwrap();
    });
    assert_eq!(c.held_peak, 4 * (small + large) as u64);
    // Both are cached now (b was dropped at the end of the closure): held, no longer live.
    assert_eq!(gpu.memory().pooled, 4 * (small + large) as u64);
    assert_eq!(gpu.memory().live, 0);
}
