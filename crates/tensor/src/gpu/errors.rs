//! How a device that says no reaches the caller: as an [`Error`], never as a panic or a hang.
//!
//! wgpu reports failures in three ways, and each gets its own handling here:
//! - **Requests checked up front.** Asking `request_device` for a limit or feature the adapter
//!   does not have fails with one opaque line about the last bad limit; [`check_request`]
//!   compares the whole request with what the adapter offers first and lists every shortfall,
//!   asked against available.
//! - **Error scopes.** Most calls (`create_buffer`, `create_bind_group`, `queue.submit`) return
//!   nothing and report a validation or out-of-memory error to the innermost *error scope* of
//!   the calling thread. [`capture`] runs a call inside scopes for all three error kinds and
//!   hands back what they caught, so the call site can turn it into an error that names what it
//!   was doing (the kernel, the bytes asked). Scopes cost a few hundred nanoseconds, so they
//!   wrap what happens rarely: a fresh allocation, an upload, compiling a kernel, and each
//!   submission of a batch. A dispatch has none: its bindings are checked by our own code
//!   before it is recorded (see the kernel layouts, `layout.rs`), and whatever wgpu still
//!   rejects in a batch is reported when the batch is submitted.
//! - **The uncaptured-error handler and the device-lost callback.** An error outside any scope
//!   goes to the handler; wgpu's default handler panics, so [`Health::install`] replaces it by
//!   one that records the message, and the next flush or sync returns it. A lost device (driver
//!   reset, `destroy`) is reported once through the device-lost callback; [`Health`] remembers
//!   it, and every later operation of the context fails at once with [`Error::DeviceLost`]
//!   instead of waiting on a device that will never answer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::{Error, Result};

/// Uncaptured messages kept until the next flush reports them (the count of the rest is kept).
const MAX_PENDING: usize = 8;

/// What has gone wrong with a device outside any error scope.
#[derive(Default)]
pub(crate) struct Health {
    lost: AtomicBool,
    lost_reason: Mutex<Option<String>>,
    pending: Mutex<Vec<String>>,
    dropped: Mutex<usize>,
}

impl Health {
    /// Install the uncaptured-error handler and the device-lost callback of `device`.
    pub fn install(device: &wgpu::Device) -> Arc<Health> {
        let health = Arc::new(Health::default());
        let sink = health.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| sink.record(describe(&e))));
        let sink = health.clone();
        device.set_device_lost_callback(move |reason, message| {
            let why = match reason {
                wgpu::DeviceLostReason::Destroyed => "Destroyed".to_string(),
                wgpu::DeviceLostReason::Unknown => "Unknown".to_string(),
            };
            sink.mark_lost(if message.is_empty() {
                why
            } else {
                format!("{why}: {message}")
            });
        });
        health
    }

    /// Remember an error that no scope caught.
    pub fn record(&self, message: String) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() < MAX_PENDING {
            pending.push(message);
        } else {
            *self.dropped.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        }
    }

    /// Remember that the device is gone, and why (the first reason wins).
    pub fn mark_lost(&self, why: String) {
        let mut reason = self.lost_reason.lock().unwrap_or_else(|p| p.into_inner());
        if reason.is_none() {
            *reason = Some(why);
        }
        self.lost.store(true, Ordering::Release);
    }

    /// Why the device was lost, if it was.
    pub fn lost_reason(&self) -> Option<String> {
        if !self.lost.load(Ordering::Acquire) {
            return None;
        }
        self.lost_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// `Err(DeviceLost)` once the device is lost. Every GPU operation starts with this.
    pub fn check(&self) -> Result<()> {
        match self.lost_reason() {
            Some(why) => Err(Error::DeviceLost(why)),
            None => Ok(()),
        }
    }

    /// The errors no scope caught since the last call, as one error (and forget them).
    pub fn take_pending(&self) -> Result<()> {
        let messages = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let dropped = std::mem::take(&mut *self.dropped.lock().unwrap_or_else(|p| p.into_inner()));
        if messages.is_empty() {
            return Ok(());
        }
        let mut msg = format!(
            "the batch of GPU commands was rejected and its results are undefined: {}",
            messages.join("; ")
        );
        if dropped > 0 {
            msg.push_str(&format!(" (and {dropped} more errors)"));
        }
        Err(Error::Gpu(msg))
    }
}

/// A wgpu error as one line: its kind and wgpu's description, whose chain of causes (one per
/// line, under "Caused by:") is joined with ": ".
pub(crate) fn describe(e: &wgpu::Error) -> String {
    let (kind, description) = match e {
        wgpu::Error::OutOfMemory { .. } => return "out of memory".to_string(),
        wgpu::Error::Validation { description, .. } => ("validation error", description),
        wgpu::Error::Internal { description, .. } => ("internal error", description),
    };
    let causes: Vec<&str> = description
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "Caused by:" && *l != "Validation Error")
        .collect();
    format!("{kind}: {}", causes.join(": "))
}

/// Run `f` inside error scopes for validation, out-of-memory and internal errors; returns its
/// value and the first error caught (validation first, then out of memory, then internal).
pub(crate) fn capture<T>(device: &wgpu::Device, f: impl FnOnce() -> T) -> (T, Option<wgpu::Error>) {
    let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let value = f();
    // Scopes pop in reverse order of their pushes; each future is ready on native backends.
    let v = pollster::block_on(validation.pop());
    let o = pollster::block_on(oom.pop());
    let i = pollster::block_on(internal.pop());
    (value, v.or(o).or(i))
}

/// Turn an error caught while allocating `needed` bytes for `what` into ours: out of memory
/// names the bytes asked and the bytes live tensors hold; a lost device says so.
pub(crate) fn alloc_error(
    e: wgpu::Error,
    what: &str,
    needed: u64,
    live: u64,
    health: &Health,
) -> Error {
    if let Some(why) = health.lost_reason() {
        return Error::DeviceLost(why);
    }
    match e {
        wgpu::Error::OutOfMemory { .. } => Error::OutOfMemory {
            what: what.to_string(),
            needed,
            live,
            detail: "the GPU driver refused the allocation (wgpu: out of memory)".into(),
        },
        other => Error::Gpu(format!(
            "allocating {} for {what}: {}",
            crate::error::bytes(needed),
            describe(&other)
        )),
    }
}

/// Compare what a device request asks for with what `adapter` offers; every limit asked above
/// (or, for alignments, below) the adapter's and every feature it lacks is listed in the error.
pub(crate) fn check_request(
    adapter: &str,
    asked: &wgpu::Limits,
    offered: &wgpu::Limits,
    asked_features: wgpu::Features,
    offered_features: wgpu::Features,
) -> Result<()> {
    let mut missing = Vec::new();
    asked.check_limits_with_fail_fn(offered, false, |name, asked, available| {
        missing.push(format!(
            "limit `{name}`: asked {asked}, the adapter offers {available}"
        ));
    });
    let absent = asked_features - offered_features;
    if !absent.is_empty() {
        missing.push(format!("features not offered: {absent}"));
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::Unsupported {
            adapter: adapter.to_string(),
            missing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_above_the_adapter_lists_every_shortfall() {
        let offered = wgpu::Limits::default();
        let asked = wgpu::Limits {
            max_buffer_size: offered.max_buffer_size * 2,
            max_storage_buffer_binding_size: offered.max_storage_buffer_binding_size + 4,
            ..offered.clone()
        };
        let err = check_request(
            "test adapter",
            &asked,
            &offered,
            wgpu::Features::SHADER_F16,
            wgpu::Features::empty(),
        )
        .unwrap_err();
        let msg = err.to_string();
        for part in [
            "test adapter",
            &format!(
                "`max_buffer_size`: asked {}, the adapter offers {}",
                asked.max_buffer_size, offered.max_buffer_size
            ),
            "max_storage_buffer_binding_size",
            "features not offered: SHADER_F16",
        ] {
            assert!(msg.contains(part), "{msg:?} lacks {part:?}");
        }
        assert!(
            check_request(
                "a",
                &offered,
                &offered,
                wgpu::Features::empty(),
                wgpu::Features::empty()
            )
            .is_ok()
        );
    }

    #[test]
    fn out_of_memory_names_the_bytes_and_a_lost_device_wins() {
        let health = Health::default();
        let oom = || wgpu::Error::OutOfMemory {
            source: Box::new(std::fmt::Error),
        };
        let err = alloc_error(oom(), "a tensor of shape [4, 4]", 1 << 30, 5 << 20, &health);
        assert!(
            matches!(err, Error::OutOfMemory { needed, live, .. } if needed == 1 << 30 && live == 5 << 20)
        );
        let msg = err.to_string();
        assert!(
            msg.contains("1073741824 bytes (1.0 GiB)") && msg.contains("[4, 4]"),
            "{msg}"
        );
        health.mark_lost("Unknown: driver reset".into());
        assert_eq!(
            alloc_error(oom(), "x", 4, 0, &health),
            Error::DeviceLost("Unknown: driver reset".into())
        );
    }

    #[test]
    fn a_description_with_causes_becomes_one_line() {
        let e = wgpu::Error::Validation {
            source: Box::new(std::fmt::Error),
            description: "Validation Error\n\nCaused by:\n  In Device::create_buffer\n    \
                          Buffer size 8 is greater than the maximum buffer size (4)\n"
                .into(),
        };
        assert_eq!(
            describe(&e),
            "validation error: In Device::create_buffer: \
             Buffer size 8 is greater than the maximum buffer size (4)"
        );
    }

    #[test]
    fn uncaptured_errors_are_reported_once() {
        let health = Health::default();
        assert!(health.take_pending().is_ok());
        for i in 0..MAX_PENDING + 3 {
            health.record(format!("error {i}"));
        }
        let msg = health.take_pending().unwrap_err().to_string();
        assert!(
            msg.contains("error 0") && msg.contains("and 3 more errors"),
            "{msg}"
        );
        assert!(health.take_pending().is_ok());
    }
}

/// The error paths of a real device: bad dispatches, rejected batches, uncaptured errors.
#[cfg(test)]
mod gpu_tests {
    use std::sync::Arc;

    use crate::gpu::{Binding, GpuContext, GpuOptions, Kernel};
    use crate::{Device, Error, Tensor, testing};

    /// `dst[i] = src[i]` for `i < n`.
    const COPY: Kernel = Kernel {
        shader: "device_errors_test",
        source: "struct P { n: u32, pad0: u32, pad1: u32, pad2: u32 }
            @group(0) @binding(0) var<uniform> p: P;
            @group(0) @binding(1) var<storage, read> src: array<f32>;
            @group(0) @binding(2) var<storage, read_write> dst: array<f32>;
            @compute @workgroup_size(64)
            fn copy(@builtin(global_invocation_id) id: vec3<u32>) {
                if (id.x < p.n) { dst[id.x] = src[id.x]; }
            }",
        entry: "copy",
    };

    /// A context of its own, since these tests break it on purpose.
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

    fn params(n: u32) -> [u8; 16] {
        bytemuck::cast([n, 0, 0, 0])
    }

    fn whole(t: &Tensor) -> Binding<'_> {
        Binding {
            buffer: t.gpu_buffer().unwrap(),
            offset: 0,
            size: t.bytes(),
        }
    }

    /// The context still computes: an upload, a kernel and a readback give the right numbers.
    fn still_works(ctx: &Arc<GpuContext>) {
        let device = Device::Gpu(ctx.clone());
        let src = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[4], &device).unwrap();
        let dst = Tensor::zeros(&[4], &device).unwrap();
        ctx.dispatch(
            COPY,
            &params(4),
            &[(1, whole(&src)), (2, whole(&dst))],
            [1, 1, 1],
        )
        .unwrap();
        assert_eq!(dst.to_vec().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        ctx.sync().unwrap();
    }

    #[test]
    fn a_binding_outside_its_buffer_is_an_error_of_its_dispatch() {
        let Some(ctx) = own() else {
            return;
        };
        let device = Device::Gpu(ctx.clone());
        let src = Tensor::zeros(&[64], &device).unwrap();
        let dst = Tensor::zeros(&[64], &device).unwrap();
        let past_end = Binding {
            buffer: src.gpu_buffer().unwrap(),
            offset: 0,
            size: src.gpu_buffer().unwrap().size() + 256,
        };
        let err = ctx
            .dispatch(
                COPY,
                &params(64),
                &[(1, past_end), (2, whole(&dst))],
                [1, 1, 1],
            )
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("binding the buffers of device_errors_test::copy: binding 1: expected a range inside its buffer"),
            "{msg}"
        );
        // A binding left out, or one the kernel does not have, is refused the same way.
        let missing = ctx
            .dispatch(COPY, &params(64), &[(2, whole(&dst))], [1, 1, 1])
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("copy: expected 2 storage bindings (1, 2), found 1 (2)"),
            "{missing}"
        );
        let extra = [(1, whole(&src)), (3, whole(&dst))];
        let msg = ctx
            .dispatch(COPY, &params(64), &extra, [1, 1, 1])
            .unwrap_err();
        assert!(msg.to_string().contains("no storage binding 3"), "{msg}");
        let short = ctx.dispatch(
            COPY,
            &[0u8; 8],
            &[(1, whole(&src)), (2, whole(&dst))],
            [1, 1, 1],
        );
        assert!(
            short
                .unwrap_err()
                .to_string()
                .contains("expected 16 to 256 bytes of Params, found 8"),
        );
        // The bad dispatches never entered the batch: the next flush is clean.
        still_works(&ctx);
    }

    #[test]
    fn workgroups_over_the_limit_are_refused_before_recording() {
        let Some(ctx) = own() else {
            return;
        };
        let device = Device::Gpu(ctx.clone());
        let t = Tensor::zeros(&[4], &device).unwrap();
        let max = ctx.limits.max_compute_workgroups_per_dimension;
        let err = ctx
            .dispatch(
                COPY,
                &params(4),
                &[(1, whole(&t)), (2, whole(&t))],
                [max + 1, 1, 1],
            )
            .unwrap_err();
        assert_eq!(
            err,
            Error::Limit {
                limit: "max_compute_workgroups_per_dimension",
                needed: max as u64 + 1,
                available: max as u64,
            }
        );
        still_works(&ctx);
    }

    #[test]
    fn a_rejected_batch_is_an_error_at_flush_and_the_next_batch_runs() {
        let Some(ctx) = own() else {
            return;
        };
        let device = Device::Gpu(ctx.clone());
        let small = Tensor::zeros(&[64], &device).unwrap();
        let large = Tensor::zeros(&[1024], &device).unwrap();
        // Two fills (of the zeros) and a copy past the end of its destination, which is only
        // found when the encoder finishes.
        ctx.copy(
            large.gpu_buffer().unwrap(),
            0,
            small.gpu_buffer().unwrap(),
            0,
            large.bytes(),
        );
        let err = ctx.sync().unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, Error::Gpu(_))
                && msg.contains("submitting a batch of 3 GPU commands (none of them ran")
                && msg.contains("overrunning the bounds of the Destination buffer"),
            "{msg}"
        );
        still_works(&ctx);
    }

    #[test]
    fn an_error_outside_any_scope_is_reported_at_the_next_flush_not_a_panic() {
        let Some(ctx) = own() else {
            return;
        };
        let device = Device::Gpu(ctx.clone());
        let t = Tensor::zeros(&[4], &device).unwrap();
        // Straight to wgpu, past every check of ours: with wgpu's default handler this panics.
        ctx.queue
            .write_buffer(t.gpu_buffer().unwrap(), 1 << 20, &[0u8; 16]);
        let msg = ctx.flush().unwrap_err().to_string();
        assert!(
            msg.contains("the batch of GPU commands was rejected")
                && msg.contains("validation error"),
            "{msg}"
        );
        still_works(&ctx);
    }

    #[test]
    fn a_shader_that_does_not_compile_is_an_error_naming_it() {
        let Some(ctx) = own() else {
            return;
        };
        let device = Device::Gpu(ctx.clone());
        let t = Tensor::zeros(&[4], &device).unwrap();
        let broken = Kernel {
            shader: "device_errors_broken",
            source: "@compute @workgroup_size(1) fn main() { let x: u32 = 1.5; }",
            entry: "main",
        };
        let msg = ctx
            .dispatch(broken, &params(4), &[(1, whole(&t))], [1, 1, 1])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("compiling device_errors_broken::main: validation error"),
            "{msg}"
        );
        still_works(&ctx);
    }
}
