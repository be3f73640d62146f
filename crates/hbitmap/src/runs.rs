//! Iteration over dirty runs.

use crate::HBitmap;

/// Iterator over the maximal dirty runs of an [`HBitmap`], as
/// `(start, len)` in items, in increasing order. Each step costs
/// O(log_64 bits). Made by [`HBitmap::runs`] and [`HBitmap::runs_from`].
#[derive(Debug, Clone)]
pub struct Runs<'a> {
    bitmap: &'a HBitmap,
    pos: u64,
}

impl<'a> Runs<'a> {
    pub(crate) fn new(bitmap: &'a HBitmap, start: u64) -> Self {
        Runs { bitmap, pos: start }
    }
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let len = self.bitmap.len();
        let start = self.bitmap.next_dirty(self.pos, len)?;
        let end = self.bitmap.next_zero(start, len).unwrap_or(len);
        self.pos = end;
        Some((start, end - start))
    }
}

impl std::iter::FusedIterator for Runs<'_> {}
