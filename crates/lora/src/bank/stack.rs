//! [`SiteStack`]: the adapters of one site, stacked by slot on the bank's device, and the three
//! things done to it: write one adapter into its slot, clear a slot, and re-lay it out (more
//! slots, or a larger rank).
//!
//! ```text
//! A: (capacity, r, in)    B: (capacity, width, r)    scales: (capacity)
//! slot i of an adapter of rank r_i ≤ r:
//!     A[i, 0..r_i, :] = A_i        A[i, r_i..r, :] = 0
//!     B[i, :, 0..r_i] = B_i        B[i, :, r_i..r] = 0
//!     scales[i] = s_i
//! ```
//!
//! The stacks are the only copy of the adapters' weights the bank keeps (on the CPU device the
//! stack buffers themselves). Writing slot i uploads A_i and B_i padded to r (one slot's bytes)
//! and copies them in place ([`write_axis`]); no other slot is touched. A re-layout copies the
//! whole stack into a bigger one, once per doubling of the capacity or growth of the rank.

use tensor::ops::slice::write_axis;
use tensor::{Device, Tensor};
use transformer::GptConfig;

use super::host::HostSite;
use crate::error::Result;
use crate::target::Target;

/// The stacked adapters of one site; see the module doc.
pub(super) struct SiteStack {
    pub target: Target,
    /// First output column of the Linear the site adds into.
    pub col0: usize,
    /// The largest rank of the adapters written here (since the stack was made).
    pub r: usize,
    /// (capacity, r, in).
    pub a: Tensor,
    /// (capacity, width, r).
    pub b: Tensor,
    /// (capacity).
    pub scales: Tensor,
    /// Adapters with weights here; the stack is dropped when none is left.
    pub users: usize,
}

impl SiteStack {
    /// An empty (all zero) stack of `capacity` slots of rank `r` for `target` of a model of
    /// shape `config`.
    pub fn new(
        target: Target,
        config: &GptConfig,
        capacity: usize,
        r: usize,
        device: &Device,
    ) -> Result<SiteStack> {
        let n_in = target.module().shape(config).0;
        let (col0, width) = target.columns(config);
        Ok(SiteStack {
            target,
            col0,
            r,
            a: Tensor::zeros(&[capacity, r, n_in], device)?,
            b: Tensor::zeros(&[capacity, width, r], device)?,
            scales: Tensor::zeros(&[capacity], device)?,
            users: 0,
        })
    }

    fn dims(&self) -> (usize, usize, usize) {
        let (a, b) = (self.a.shape(), self.b.shape());
        (a[0], a[2], b[1]) // capacity, in, width
    }

    /// Copies the stack into one of `capacity` slots (≥ its own) of rank `r` (≥ its own): the
    /// slots keep their indices, the new rows and columns are zero.
    pub fn relayout(&mut self, capacity: usize, r: usize) -> Result<()> {
        debug_assert!(
            capacity >= self.dims().0 && r >= self.r,
            "a stack only grows"
        );
        self.a = grow(&grow(&self.a, 1, r)?, 0, capacity)?;
        self.b = grow(&grow(&self.b, 2, r)?, 0, capacity)?;
        self.scales = grow(&self.scales, 0, capacity)?;
        self.r = r;
        Ok(())
    }

    /// Writes `site` (rank ≤ the stack's) into `slot`, zero-padded to the stack's rank.
    pub fn write(&self, slot: usize, site: &HostSite) -> Result<()> {
        let (_, n_in, width) = self.dims();
        let (r, rs) = (self.r, site.r);
        debug_assert!(rs <= r, "the stack was re-laid out for this rank first");
        // A's rs rows go first in its r rows; B's rs columns first in each of its rows.
        let mut a = vec![0.0; r * n_in];
        a[..rs * n_in].copy_from_slice(&site.a);
        let mut b = vec![0.0; width * r];
        for (j, row) in site.b.chunks(rs).enumerate() {
            b[j * r..][..rs].copy_from_slice(row);
        }
        self.put(slot, a, b, site.scale)
    }

    /// Zeroes `slot` (its adapter left): no row indexes it until it is written again.
    pub fn clear(&self, slot: usize) -> Result<()> {
        let (_, n_in, width) = self.dims();
        self.put(
            slot,
            vec![0.0; self.r * n_in],
            vec![0.0; width * self.r],
            0.0,
        )
    }

    fn put(&self, slot: usize, a: Vec<f32>, b: Vec<f32>, scale: f32) -> Result<()> {
        let (_, n_in, width) = self.dims();
        let device = self.a.device();
        let a = Tensor::from_vec(a, &[1, self.r, n_in], &device)?;
        let b = Tensor::from_vec(b, &[1, width, self.r], &device)?;
        let s = Tensor::from_vec(vec![scale], &[1], &device)?;
        write_axis(&self.a, 0, slot, &a, false)?;
        write_axis(&self.b, 0, slot, &b, false)?;
        write_axis(&self.scales, 0, slot, &s, false)?;
        Ok(())
    }

    /// Bytes of its three tensors.
    pub fn bytes(&self) -> u64 {
        self.a.bytes() + self.b.bytes() + self.scales.bytes()
    }
}

/// `t` with `axis` lengthened to `len`: t's values first, zeros after (t itself when it has that
/// length already).
fn grow(t: &Tensor, axis: usize, len: usize) -> Result<Tensor> {
    if t.shape()[axis] == len {
        return Ok(t.clone());
    }
    let mut shape = t.shape().to_vec();
    shape[axis] = len;
    let out = Tensor::zeros(&shape, &t.device())?;
    write_axis(&out, axis, 0, t, false)?;
    Ok(out)
}
