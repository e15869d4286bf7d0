//! Launches of decode.cu: the KV cache of generation on a GPU (decode_cuda.rs), whose layout is
//! (sequence, layer, position, channel): a (block, C) matrix of keys and one of values per sequence and layer.

use candle_core::{bail, Result};

use super::{blocks_for, Arg, Gpu, Precision};

/// Threads per block of the copies (one element each) and of the attention (one block per query and head).
const THREADS: u32 = 128;

/// The most blocks a CUDA grid has along y and z: [`attend`]'s heads and sequences.
const MAX_GRID_YZ: usize = 65535;

/// Refuses, before anything is allocated, a generation of `batch` sequences that [`attend`] cannot launch on `gpu`
/// for a model of width `c`, `nh` heads and a context of `block` positions.
pub fn check(gpu: &dyn Gpu, c: usize, nh: usize, block: usize, batch: usize) -> Result<()> {
    if batch > MAX_GRID_YZ {
        bail!("the GPU decodes at most {MAX_GRID_YZ} sequences at once, not {batch}: lower num_samples");
    }
    let shared = attend_shared_bytes(c, nh, block);
    if shared > gpu.max_shared_bytes() as usize {
        bail!(
            "block_size {block} needs {} KiB of shared memory a block in the GPU decoder's attention, more than this GPU's {} KiB",
            shared.div_ceil(1024),
            gpu.max_shared_bytes() / 1024
        );
    }
    Ok(())
}

/// [`attend`]'s shared memory: the scaled query, a score per cached position, and the reductions' 32 floats.
fn attend_shared_bytes(c: usize, nh: usize, block: usize) -> usize {
    (c / nh + block + 32) * 4
}

/// Where a KV cache is and how it is laid out: `keys` and `values` hold B x L x block x C elements of X.
#[derive(Clone, Copy, Debug)]
pub struct Cache {
    pub keys: u64,
    pub values: u64,
    pub n_layer: usize,
    pub block: usize,
    pub c: usize,
}

impl Cache {
    /// Elements from one sequence's matrices to the next's.
    fn seq_stride(&self) -> i64 {
        (self.n_layer * self.block * self.c) as i64
    }

    /// Elements from a sequence's first layer to layer `l`.
    fn layer_offset(&self, l: usize) -> i64 {
        (l * self.block * self.c) as i64
    }
}

fn int(what: &str, value: usize) -> Result<Arg> {
    match i32::try_from(value) {
        Ok(v) => Ok(Arg::I32(v)),
        Err(_) => bail!("{what}: {value} is more than 2^31 - 1"),
    }
}

/// Copies the keys and values of `qkv` (B*T rows of query, key, value, 3C of X each; row r is position
/// `pos0 + r % t` of sequence `r / t`) into layer `l` of the cache.
#[allow(clippy::too_many_arguments)]
pub fn append(gpu: &dyn Gpu, x: Precision, cache: &Cache, l: usize, qkv: u64, rows: usize, t: usize, pos0: usize) -> Result<()> {
    if rows == 0 || t == 0 || !rows.is_multiple_of(t) || pos0 + t > cache.block {
        bail!("kv_append: {rows} rows of {t} positions after {pos0} do not fit the cache's {} positions", cache.block);
    }
    let args = [
        Arg::Ptr(cache.keys),
        Arg::Ptr(cache.values),
        Arg::Ptr(qkv),
        int("kv_append rows", rows)?,
        int("kv_append t", t)?,
        int("kv_append pos0", pos0)?,
        int("kv_append C", cache.c)?,
        Arg::I64(cache.layer_offset(l)),
        Arg::I64(cache.seq_stride()),
    ];
    gpu.launch(&x.kernel("kv_append"), [blocks_for(rows * cache.c, THREADS), 1, 1], [THREADS, 1, 1], 0, &args)
}

/// `out` (B*T, C of X): each new position's attention, with `nh` heads, over layer `l` of the cache up to and
/// including its own position; its query is the first C of its row of `qkv` (B*T rows of 3C), and the cache
/// already holds its key and value ([`append`]).
#[allow(clippy::too_many_arguments)]
pub fn attend(
    gpu: &dyn Gpu,
    x: Precision,
    out: u64,
    qkv: u64,
    cache: &Cache,
    l: usize,
    b: usize,
    t: usize,
    pos0: usize,
    nh: usize,
) -> Result<()> {
    if b == 0 || t == 0 || nh == 0 || !cache.c.is_multiple_of(nh) || pos0 + t > cache.block {
        bail!("attend_to_cache: {b} sequences of {t} positions after {pos0}, {nh} heads of C = {} in a cache of {}", cache.c, cache.block);
    }
    let layer = |base: u64| base + (cache.layer_offset(l) as usize * x.size_in_bytes()) as u64;
    let args = [
        Arg::Ptr(out),
        Arg::Ptr(qkv),
        Arg::Ptr(layer(cache.keys)),
        Arg::Ptr(layer(cache.values)),
        int("attend_to_cache t", t)?,
        int("attend_to_cache pos0", pos0)?,
        int("attend_to_cache C", cache.c)?,
        int("attend_to_cache heads", nh)?,
        int("attend_to_cache block", cache.block)?,
        Arg::I64(cache.seq_stride()),
    ];
    let shared = attend_shared_bytes(cache.c, nh, cache.block);
    gpu.launch(&x.kernel("attend_to_cache"), [t as u32, nh as u32, b as u32], [THREADS, 1, 1], shared as u32, &args)
}

/// `dst` (B, C of X) = the last of each sequence's T rows of `src` (B*T, C).
pub fn last_rows(gpu: &dyn Gpu, x: Precision, dst: u64, src: u64, b: usize, t: usize, c: usize) -> Result<()> {
    let args = [Arg::Ptr(dst), Arg::Ptr(src), int("last_rows B", b)?, int("last_rows T", t)?, int("last_rows C", c)?];
    gpu.launch(&x.kernel("last_rows"), [blocks_for(b * c, THREADS), 1, 1], [THREADS, 1, 1], 0, &args)
}
