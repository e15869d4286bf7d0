//! `ts/engine-types.ts` holds the TypeScript declarations of the structs that cross the bindings,
//! generated from the Rust structs (ts-rs) so that the two sides cannot drift apart. This test fails
//! when the committed file is out of date; `npm run gen:types` (which runs it with
//! `NANOGPT_UPDATE_TYPES=1`) rewrites it.

use nanogpt_core::engine::PhaseTimes;
use nanogpt_core::torch_checkpoint::CheckpointInfo;
use nanogpt_core::{Gelu, LrSchedule, MemoryEstimate, MemoryStats, ModelArgs, OptimizerArgs, ParamGroups, StepStats};
use ts_rs::{Config, TS};

/// One exported declaration, its doc comment first.
fn declaration<T: TS>(cfg: &Config) -> String {
    format!("{}export {}\n", T::docs().unwrap_or_default(), T::decl(cfg))
}

fn generated() -> String {
    // JavaScript numbers: every integer here (byte counts, iterations) is far below 2^53.
    let cfg = Config::new().with_large_int("number");
    let declarations = [
        declaration::<Gelu>(&cfg),
        declaration::<ModelArgs>(&cfg),
        declaration::<OptimizerArgs>(&cfg),
        declaration::<LrSchedule>(&cfg),
        declaration::<ParamGroups>(&cfg),
        declaration::<StepStats>(&cfg),
        declaration::<MemoryEstimate>(&cfg),
        declaration::<MemoryStats>(&cfg),
        declaration::<PhaseTimes>(&cfg),
        declaration::<CheckpointInfo>(&cfg),
    ];
    let text = format!(
        "// Generated from the Rust structs of crates/nanogpt-core by `npm run gen:types` (ts-rs); do not edit.\n\
         // The types that cross between the engine and TypeScript, in both bindings.\n\n{}",
        declarations.join("\n")
    );
    text.lines().map(|line| format!("{}\n", line.trim_end())).collect()
}

#[test]
fn engine_types_are_up_to_date() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ts/engine-types.ts");
    let want = generated();
    if std::env::var_os("NANOGPT_UPDATE_TYPES").is_some() {
        std::fs::write(&path, &want).unwrap();
        return;
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(have == want, "{} is out of date with the Rust structs; run `npm run gen:types`", path.display());
}
