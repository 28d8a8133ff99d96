"""Pack mlx[cuda13] for the GPU machine of `gpu_check.sh`: `.devgpu/site.tar.xz` and `.devgpu/tok`.

That machine has no network and takes at most 64 MiB of carried files; the mlx-cuda-13 wheel
alone is 90 MB. Its `libmlx.so` holds the CUDA kernels for six GPU generations (sm_75 to
sm_121, 58 MB of its `.nv_fatbin`); this keeps the one for `--arch` (90: the H100/H200) and
zeroes the payloads of the others (the fatbin's headers stay, so the CUDA runtime still finds
the kept one), strips the symbol table, and packs the mlx, mlx-cuda-13 and mlx-lm wheels as
one site folder: about 21 MB. The embedded model's tokenizer files go to `.devgpu/tok`
(`random_embedded.py` builds the model there).

    python scripts/pack_mlx_cuda.py            # then: run scripts/gpu_check.sh with carry [".devgpu"]

`.devgpu/` must be ignored (`echo /.devgpu/ >> .git/info/exclude`).
"""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ("mlx==0.32.4", "mlx-cuda-13==0.32.4", "mlx-lm==0.32.2")  # the versions the project pins here
PLATFORMS = ("manylinux_2_35_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64")
FATBIN_MAGIC = 0xBA55ED50


def section(path: Path, name: str) -> tuple[int, int]:
    """(file offset, size) of an ELF section, read with readelf."""
    for line in subprocess.check_output(["readelf", "-S", "-W", str(path)], text=True).splitlines():
        parts = line.split()
        if name in parts:
            i = parts.index(name)
            return int(parts[i + 3], 16), int(parts[i + 4], 16)
    raise SystemExit(f"{path}: no {name} section")


def keep_arch(path: Path, arch: int) -> dict[int, int]:
    """Zero every fatbin entry of `path` not built for `arch`; returns bytes kept/zeroed per arch
    (negative: zeroed). Entry layout: kind u16, version u16, header size u32, padded payload
    size u32, ..., the SM version (u32) at byte 28 of the entry header."""
    data = bytearray(path.read_bytes())
    start, size = section(path, ".nv_fatbin")
    pos, end, seen = start, start + size, {}
    while pos < end - 16:
        magic, _, header, fat = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            pos += 8
            continue
        p, stop = pos + header, pos + header + fat
        while p < stop:
            _, _, entry_header, padded = struct.unpack_from("<HHII", data, p)
            sm = struct.unpack_from("<I", data, p + 28)[0]
            if sm != arch:
                data[p + entry_header : p + entry_header + padded] = bytes(padded)
            seen[sm] = seen.get(sm, 0) + (padded if sm == arch else -padded)
            p += entry_header + padded
        pos = stop
    if arch not in seen:
        raise SystemExit(f"{path}: no kernels for sm_{arch} (has {sorted(seen)})")
    path.write_bytes(data)
    return seen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="the SM version to keep (90: Hopper)")
    ap.add_argument("--out", type=Path, default=ROOT / ".devgpu")
    ap.add_argument("--tokenizer", type=Path, default=None, help="default: the fetched embedded model's folder")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheels, site = Path(tmp) / "wheels", Path(tmp) / "site"
        platforms = [a for p in PLATFORMS for a in ("--platform", p)]
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
             "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(wheels), *WHEELS],
            check=True,
        )  # fmt: skip
        for wheel in sorted(wheels.glob("*.whl")):
            zipfile.ZipFile(wheel).extractall(site)
        lib = site / "mlx" / "lib" / "libmlx.so"
        print({f"sm_{k}": v for k, v in sorted(keep_arch(lib, args.arch).items())})
        subprocess.run(["strip", "--strip-unneeded", str(lib)], check=True)
        args.out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.out / "site.tar.xz", "w:xz", preset=6) as tar:
            for item in sorted(site.iterdir()):
                tar.add(item, arcname=item.name)
    tokenizer = args.tokenizer
    if tokenizer is None:
        from cast_mlx.engine import models

        tokenizer = models.fetch(models.DEFAULT_MODEL)
    (args.out / "tok").mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer / name, args.out / "tok" / name)
    print(f"{args.out}: {sum(f.stat().st_size for f in args.out.rglob('*') if f.is_file()) / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
