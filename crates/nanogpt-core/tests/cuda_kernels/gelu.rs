//! gelu.cu against kernels/gelu.rs, exact and tanh, forward and backward (in place and not, with the
//! forward's output recomputed).

use nanogpt_core::kernels::cuda::{gelu, Precision};
use nanogpt_core::kernels::gelu as cpu;

use crate::gpu::{assert_close, gpu, random, tolerance, Buffer};

// An odd size: the last thread's pack of elements partly out of range.
const N: usize = 1037;

/// With `misaligned`, the input starts one element past an aligned address (a slice of a larger buffer),
/// so that no thread's pack can be read as one 16-byte access.
fn check_forward(x: Precision, tanh: bool, misaligned: bool) {
    let shift = misaligned as usize;
    let inp = Buffer::new(x, &random(N + shift, 5.0, 1));
    let out = Buffer::new(x, &vec![0.0; N]);
    gelu::forward(gpu(), x, out.addr(), inp.addr() + (shift * x.size_in_bytes()) as u64, N, tanh).unwrap();
    let mut want = vec![0.0; N];
    cpu::forward(&mut want, &inp.values()[shift..], tanh);
    assert_close(&format!("gelu {x:?} tanh={tanh} misaligned={misaligned}"), &out.values(), &want, tolerance(x));
}

/// The gradient (in place over dout, or not) and the recomputed forward output.
fn check_backward(x: Precision, tanh: bool, in_place: bool) {
    let inp = Buffer::new(x, &random(N, 5.0, 2));
    let dout = Buffer::new(x, &random(N, 1.0, 3));
    let mut want = dout.values();
    cpu::backward(&mut want, &inp.values(), tanh);
    let mut want_out = vec![0.0; N];
    cpu::forward(&mut want_out, &inp.values(), tanh);
    let dinp = if in_place { None } else { Some(Buffer::new(x, &vec![0.0; N])) };
    let target = dinp.as_ref().unwrap_or(&dout);
    let out = Buffer::new(x, &vec![0.0; N]);
    gelu::backward(gpu(), x, target.addr(), out.addr(), inp.addr(), dout.addr(), N, tanh).unwrap();
    let what = format!("gelu backward {x:?} tanh={tanh} in_place={in_place}");
    assert_close(&format!("{what}: dinp"), &target.values(), &want, tolerance(x));
    assert_close(&format!("{what}: out"), &out.values(), &want_out, tolerance(x));
}

#[test]
fn forward_matches_cpu() {
    for x in [Precision::F32, Precision::Bf16] {
        for tanh in [false, true] {
            check_forward(x, tanh, false);
            check_forward(x, tanh, true);
        }
    }
}

#[test]
fn backward_matches_cpu_in_place_and_not() {
    for x in [Precision::F32, Precision::Bf16] {
        for tanh in [false, true] {
            check_backward(x, tanh, true);
        }
    }
    check_backward(Precision::F32, false, false);
    check_backward(Precision::Bf16, true, false);
}
