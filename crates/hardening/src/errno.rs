//! One place that turns a C-style return value into `io::Result` (after sudo-rs `cutils::cerr`).

use std::io;

/// Integer return types of libc calls that signal failure with `-1` and `errno`.
pub trait SignedReturn: Copy + PartialEq {
    /// The failure value, `-1`.
    const MINUS_ONE: Self;
}

macro_rules! signed_return {
    ($($t:ty)*) => { $(impl SignedReturn for $t { const MINUS_ONE: Self = -1; })* };
}
signed_return!(i32 i64 isize);

/// Returns `Ok(res)` unless `res` is `-1`, in which case the thread's `errno` is returned as
/// an [`io::Error`].
///
/// # Errors
/// The OS error behind a `-1` return.
pub fn cerr<T: SignedReturn>(res: T) -> io::Result<T> {
    if res == T::MINUS_ONE {
        Err(io::Error::last_os_error())
    } else {
        Ok(res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cerr_passes_values_and_maps_minus_one() {
        assert_eq!(cerr(5i32).unwrap(), 5);
        assert_eq!(cerr(0i64).unwrap(), 0);
        // A real failing call sets errno: closing an fd that cannot be open.
        // SAFETY: close on an invalid descriptor only returns EBADF.
        let e = cerr(unsafe { libc::close(-1) }).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
    }
}
