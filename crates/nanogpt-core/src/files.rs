//! Where the engine's files come from and go to. The engine reads every format (safetensors,
//! nanoGPT's `ckpt.pt`) from a byte slice and writes it to a seekable [`Write`] sink; a binding
//! only picks the ends: a file on disk (mapped to read, buffered to write), or memory (the
//! WebAssembly engine, which has no file system, hands bytes to and from JavaScript).

use std::fs::File;
use std::io::{BufWriter, Cursor, Write};

use candle_core::Result;

/// The bytes of the file at `path`, paged in as they are read: a GPT-2 XL checkpoint with its AdamW
/// state is ~19 GB, and a Node.js Buffer stops at 2 GB to 4 GB. Nothing else writes a checkpoint
/// while it is read.
pub fn map(path: &str) -> Result<memmap2::Mmap> {
    let file = File::open(path).map_err(|e| candle_core::Error::Msg(format!("cannot open {path} ({e})")))?;
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| candle_core::Error::Msg(format!("cannot map {path} ({e})")))
}

/// Creates (or truncates) the file at `path` and lets `save` write it, streamed through a buffer: no
/// whole-file copy is held in memory. Replacing a file atomically (temporary file, fsync, rename) is
/// the caller's part, since only it knows the final name.
pub fn write(path: &str, save: impl FnOnce(&mut BufWriter<File>) -> Result<()>) -> Result<()> {
    let cannot_write = |e: std::io::Error| candle_core::Error::Msg(format!("cannot write {path} ({e})"));
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path).map_err(cannot_write)?);
    save(&mut out).map_err(|e| match e {
        candle_core::Error::Io(e) => cannot_write(e),
        other => other,
    })?;
    out.flush().map_err(cannot_write)
}

/// What `save` writes, as bytes in memory.
pub fn to_vec(save: impl FnOnce(&mut Cursor<Vec<u8>>) -> Result<()>) -> Result<Vec<u8>> {
    let mut out = Cursor::new(Vec::new());
    save(&mut out)?;
    Ok(out.into_inner())
}
