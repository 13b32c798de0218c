//! The parameters of one batch, gathered on the host and uploaded with one `write_buffer` when
//! the batch is submitted.
//!
//! Each dispatch's `Params` struct gets the next slot of [`PARAM_SLOT`] bytes (the largest
//! uniform offset alignment WebGPU allows, so any device accepts the slot's offset as a dynamic
//! offset). The device buffer has [`MAX_BATCH`](super::MAX_BATCH) slots, one per command a batch
//! may hold, so a batch never runs out. The buffer is reused by the next batch: a
//! `write_buffer` is applied at the next submission, after every command submitted before, so
//! no batch sees another's parameters.

use super::PARAM_SLOT;

/// The host copy of a batch's parameter slots.
#[derive(Default)]
pub(crate) struct ParamArena {
    bytes: Vec<u8>,
}

impl ParamArena {
    /// Append `params` (at most [`PARAM_SLOT`] bytes) in a slot of its own; returns the slot's
    /// byte offset, the dispatch's dynamic offset.
    pub fn push(&mut self, params: &[u8]) -> u32 {
        debug_assert!(params.len() as u64 <= PARAM_SLOT);
        let offset = self.bytes.len();
        self.bytes.extend_from_slice(params);
        self.bytes.resize(offset + PARAM_SLOT as usize, 0);
        offset as u32
    }

    /// The slots written so far, to upload at offset 0.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Forget the slots (keeping the allocation for the next batch).
    pub fn clear(&mut self) {
        self.bytes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_dispatch_gets_its_own_aligned_slot() {
        let mut arena = ParamArena::default();
        assert_eq!(arena.push(&[1, 2, 3, 4]), 0);
        assert_eq!(arena.push(&[5; 32]), PARAM_SLOT as u32);
        assert_eq!(arena.push(&[]), 2 * PARAM_SLOT as u32);
        let bytes = arena.bytes();
        assert_eq!(bytes.len() as u64, 3 * PARAM_SLOT);
        assert_eq!(&bytes[..4], &[1, 2, 3, 4]);
        assert!(bytes[4..PARAM_SLOT as usize].iter().all(|&b| b == 0));
        let second = PARAM_SLOT as usize;
        assert_eq!(&bytes[second..second + 32], &[5; 32]);
        arena.clear();
        assert!(arena.bytes().is_empty());
        assert_eq!(arena.push(&[9]), 0, "the next batch starts at slot 0");
    }
}
