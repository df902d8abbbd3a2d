//! CPU scheduling hints for the local server's threads (Linux; a no-op elsewhere).
//!
//! On a busy machine a request's latency is mostly time spent waiting for a CPU.
//! Linux's EEVDF scheduler (6.6+) runs each thread for a time slice (~1.5-3 ms by
//! default); since 6.12 a thread may ask for a shorter one, which lets it run sooner
//! after it wakes and makes it give way sooner to threads that are waiting.

use std::time::Duration;

/// Ask for `slice` (clamped by the kernel to 0.1-100 ms) and `nice` for the calling
/// thread. Returns false where that is unsupported; the thread keeps the defaults.
pub fn set_current_thread(nice: i32, slice: Duration) -> bool {
    imp::set(nice, slice)
}

#[cfg(target_os = "linux")]
mod imp {
    use std::time::Duration;

    /// `struct sched_attr` (include/uapi/linux/sched/types.h), version 1.
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
        util_min: u32,
        util_max: u32,
    }

    pub fn set(nice: i32, slice: Duration) -> bool {
        let attr = SchedAttr {
            size: std::mem::size_of::<SchedAttr>() as u32,
            policy: libc::SCHED_OTHER as u32,
            flags: 0,
            nice,
            priority: 0,
            runtime: slice.as_nanos() as u64,
            deadline: 0,
            period: 0,
            util_min: 0,
            util_max: 0,
        };
        // SAFETY: sched_setattr reads `size` bytes of a valid, initialised struct.
        let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
        if rc == 0 {
            return true;
        }
        // Kernels before 6.12 reject a slice: keep at least the nice value.
        // SAFETY: setpriority has no memory-safety preconditions.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
        false
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    pub fn set(_nice: i32, _slice: std::time::Duration) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_thread_can_ask_for_a_short_slice() {
        let t = std::thread::spawn(|| {
            let ok = super::set_current_thread(1, std::time::Duration::from_micros(100));
            // SAFETY: getpriority has no memory-safety preconditions.
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            (ok, nice)
        });
        let (_ok, nice) = t.join().unwrap();
        assert_eq!(nice, 1);
    }
}
