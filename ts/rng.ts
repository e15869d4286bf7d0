/**
 * A small seedable PRNG for batch sampling: xoshiro128** (Blackman & Vigna), seeded through splitmix32 so that
 * nearby seeds give unrelated streams. 32-bit arithmetic keeps it fast in JavaScript without BigInt.
 */
export class Rng {
  private readonly state = new Uint32Array(4);

  /** The stream of `seed`, or with `substreams`, one of the unrelated streams it names (e.g. one per batch). */
  constructor(seed: number, ...substreams: number[]) {
    let s = fold(0, seed);
    // The constant keeps (seed 0, substream 0) from mixing to 0, which would make it seed 0's own stream.
    for (const substream of substreams) s = fold(fmix32(s ^ 0x9e3779b9), substream);
    for (let i = 0; i < 4; i++) {
      s = (s + 0x9e3779b9) | 0;
      let z = s ^ (s >>> 16);
      z = Math.imul(z, 0x21f0aaad);
      z ^= z >>> 15;
      z = Math.imul(z, 0x735a2d97);
      this.state[i] = z ^ (z >>> 15);
    }
  }

  nextUint32(): number {
    const s = this.state;
    const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return result;
  }

  /** Uniform in [0, 1) with 53 random bits, enough to index files far beyond 2^32 tokens. */
  nextFloat(): number {
    return ((this.nextUint32() >>> 5) * 2 ** 26 + (this.nextUint32() >>> 6)) / 2 ** 53;
  }

  /** Uniform integer in [0, n), for n up to 2^53. */
  nextInt(n: number): number {
    return Math.floor(this.nextFloat() * n);
  }
}

/** `s` with the 53-bit integer `n` mixed in. */
function fold(s: number, n: number): number {
  return s ^ (n >>> 0) ^ Math.imul(Math.floor(n / 2 ** 32) | 0, 0x9e3779b9);
}

/** MurmurHash3's finaliser: every output bit depends on every input bit. */
function fmix32(h: number): number {
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
  return h ^ (h >>> 16);
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}
