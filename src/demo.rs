//! `edgegate demo` (placeholder until written).
pub fn main(_seconds: u64) -> i32 {
    0
}
