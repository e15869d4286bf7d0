//! The emulator's built-ins behave as on a GPU (kernels in src/emulator_checks.cu).

use std::ffi::c_void;

use cuda_on_cpu::CopyLanding;

fn ptr<T>(value: &mut T) -> *mut c_void {
    value as *mut T as *mut c_void
}

#[test]
fn block_sum_reaches_every_thread_of_each_block() {
    let (blocks, threads) = (3usize, 96usize);
    let input: Vec<f32> = (0..blocks * threads).map(|i| i as f32).collect();
    let mut out = vec![0f32; input.len()];
    let (mut o, mut i) = (out.as_mut_ptr(), input.as_ptr());
    unsafe { cuda_on_cpu::launch("check_block_sum", [blocks as u32, 1, 1], [threads as u32, 1, 1], 0, &mut [ptr(&mut o), ptr(&mut i)]) }
        .unwrap();
    for b in 0..blocks {
        let want: f32 = input[b * threads..][..threads].iter().sum();
        assert!(out[b * threads..][..threads].iter().all(|&v| v == want), "block {b}: {:?}", &out[b * threads..][..4]);
    }
}

#[test]
fn dynamic_shared_memory_is_per_block_and_barriers_order_it() {
    let (blocks, threads) = (4usize, 64usize);
    let mut out = vec![0i32; blocks * threads];
    let mut o = out.as_mut_ptr();
    unsafe {
        cuda_on_cpu::launch("check_shared_rotation", [blocks as u32, 1, 1], [threads as u32, 1, 1], 4 * threads as u32, &mut [ptr(&mut o)])
    }
    .unwrap();
    for b in 0..blocks {
        for t in 0..threads {
            assert_eq!(out[b * threads + t], (b * 1000 + (t + 1) % threads) as i32);
        }
    }
}

#[test]
fn atomics_count_and_returned_threads_leave_the_barrier() {
    let (mut counter, mut after) = (0f32, 0i32);
    let (mut c, mut a, mut active) = (&mut counter as *mut f32, &mut after as *mut i32, 40i32);
    unsafe {
        cuda_on_cpu::launch("check_atomics_and_early_exit", [5, 1, 1], [64, 1, 1], 0, &mut [ptr(&mut c), ptr(&mut a), ptr(&mut active)])
    }
    .unwrap();
    assert_eq!((counter, after), (320.0, 200));
}

#[test]
fn shuffles_and_bf16_rounding_follow_cuda() {
    let n = 64usize;
    let (mut down, mut xored, mut broadcast, mut rounded) = (vec![0i32; n], vec![0i32; n], vec![0i32; n], vec![0f32; n]);
    let input: Vec<f32> = (0..n).map(|i| 1.0 + i as f32 / 1000.0).collect();
    let mut args = [down.as_mut_ptr(), xored.as_mut_ptr(), broadcast.as_mut_ptr()];
    let (mut r, mut i) = (rounded.as_mut_ptr(), input.as_ptr());
    let [a, b, c] = &mut args;
    unsafe {
        cuda_on_cpu::launch("check_shuffles", [1, 1, 1], [n as u32, 1, 1], 0, &mut [ptr(a), ptr(b), ptr(c), ptr(&mut r), ptr(&mut i)])
    }
    .unwrap();
    for t in 0..n {
        let lane = t % 32;
        assert_eq!(down[t] as usize, if lane < 31 { t + 1 } else { t }, "down {t}");
        assert_eq!(xored[t] as usize, t ^ 3, "xor {t}");
        assert_eq!(broadcast[t] as usize, t - lane + 5, "broadcast {t}");
        let bits = input[t].to_bits();
        let want = f32::from_bits((bits + 0x7fff + ((bits >> 16) & 1)) & 0xffff_0000);
        assert_eq!(rounded[t], want, "bf16 {t}");
    }
}

/// A 16-byte row, aligned as cp.async's sources must be.
#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct Row([u32; 4]);

/// What each thread of `check_async_copies` saw of its neighbour's two rows, with copies landing as `landing` says.
fn async_copies_seen(landing: CopyLanding, input: &[Row]) -> Vec<u32> {
    let n = input.len() / 2;
    let mut seen = vec![0u32; 4 * n];
    let (mut s, mut i) = (seen.as_mut_ptr(), input.as_ptr());
    unsafe {
        cuda_on_cpu::launch_landing(
            "check_async_copies",
            [1, 1, 1],
            [n as u32, 1, 1],
            32 * n as u32,
            &mut [ptr(&mut s), ptr(&mut i)],
            landing,
        )
    }
    .unwrap();
    seen
}

#[test]
fn async_copies_land_at_the_barrier_after_their_wait_or_as_issued() {
    let n = 64usize;
    let input: Vec<Row> = (0..2 * n).map(|r| Row([1000 + r as u32, 0, 0, 0])).collect();
    let (late, early) = (async_copies_seen(CopyLanding::Late, &input), async_copies_seen(CopyLanding::Early, &input));
    // Shared memory starts as 0xff bytes: a copy not yet waited for (and published by a barrier) reads as that.
    let unlanded = u32::MAX;
    for t in 0..n {
        let next = (t + 1) % n;
        let (first, second) = (input[next].0[0], if next == 0 { 0 } else { input[n + next].0[0] });
        assert_eq!(late[4 * t..][..4], [unlanded, first, unlanded, second], "late, thread {t}");
        assert_eq!(early[4 * t..][..4], [first, first, second, second], "early, thread {t}");
    }
}

#[test]
fn bad_launches_are_refused_with_the_reason() {
    let err = unsafe { cuda_on_cpu::launch("no_such_kernel", [1, 1, 1], [32, 1, 1], 0, &mut []) }.unwrap_err();
    assert!(err.contains("no CUDA kernel named no_such_kernel"), "{err}");
    let err = unsafe { cuda_on_cpu::launch("check_block_sum", [1, 1, 1], [32, 1, 1], 0, &mut []) }.unwrap_err();
    assert!(err.contains("takes 2 arguments, not 0"), "{err}");
    let mut o = std::ptr::null_mut::<i32>();
    let err = unsafe { cuda_on_cpu::launch("check_shared_rotation", [1, 1, 1], [2048, 1, 1], 0, &mut [ptr(&mut o)]) }.unwrap_err();
    assert!(err.contains("1 to 1024 threads"), "{err}");
}

#[test]
fn ldmatrix_and_mma_tiles_match_a_plain_product() {
    let (m, n, k) = (32usize, 16usize, 48usize);
    // Multiples of 1/8 below 4: exact in bf16, and their products and sums exact in float.
    let value = |i: usize, salt: usize| ((i * 7 + salt * 13) % 31) as f32 / 8.0 - 1.5;
    let (a, b, c): (Vec<f32>, Vec<f32>, Vec<f32>) =
        ((0..m * k).map(|i| value(i, 1)).collect(), (0..k * n).map(|i| value(i, 2)).collect(), (0..m * n).map(|i| value(i, 3)).collect());
    let bf16 = |v: &[f32]| -> Vec<u16> { v.iter().map(|x| (x.to_bits() >> 16) as u16).collect() };
    let want: Vec<f32> = (0..m * n).map(|e| (0..k).map(|kk| a[e / n * k + kk] * b[kk * n + e % n]).sum::<f32>() + c[e]).collect();
    let (a_in, b_in) = (bf16(&a), bf16(&b));
    let mut out = vec![f32::NAN; m * n];
    let (mut o, mut pa, mut pb, mut pc) = (out.as_mut_ptr(), a_in.as_ptr(), b_in.as_ptr(), c.as_ptr());
    unsafe { cuda_on_cpu::launch("check_mma", [1, 1, 1], [64, 1, 1], 0, &mut [ptr(&mut o), ptr(&mut pa), ptr(&mut pb), ptr(&mut pc)]) }
        .unwrap();
    assert_eq!(out, want);
}
