#!/usr/bin/env python3
"""Build the Blixard guest image from Debian packages: `make vm-image`.

    python3 vm/build_image.py --out var/vm-image            # kernel, initramfs, agent
    python3 vm/build_image.py --out var/vm-image --agent-only

Output (in --out):
    vmlinux           the uncompressed kernel of Debian's linux-image-amd64 (QEMU boots it
                      directly through PVH: no self-decompression in emulation)
    initrd.cpio       busybox (from busybox-static), the virtio modules, /init, the agent
    blixard-agent     the guest agent, static; the `process` backend runs it on the host
    manifest.json     what it was built from; an unchanged input means no rebuild

Needs: apt-get and dpkg (Debian), gcc with a static libc (libc6-dev), python3. Runs
`apt-get update` once when apt knows no candidate for the kernel package (a fresh
machine). Standard library only: it runs before the project's virtual environment exists.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
AGENT_SOURCE = HERE / "agent" / "agent.c"
INIT_SCRIPT = HERE / "init"
KERNEL_META = os.environ.get("VM_KERNEL_PACKAGE", "linux-image-amd64")
BUSYBOX_PACKAGE = "busybox-static"
# Loaded by /init in this order (virtio_ring first: virtio needs its symbols).
MODULES = (
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_mmio.ko",
    "kernel/drivers/char/virtio_console.ko",
)
FORMAT = 3  # bump when the layout of the image changes


def say(message: str) -> None:
    print(f"vm-image: {message}", flush=True)


def fail(message: str) -> None:
    print(f"vm-image: error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=False, capture_output=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]


def digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


# ---- the agent ----------------------------------------------------------------------------


def build_agent(out: Path) -> str:
    """Compile the agent (static) unless it is up to date; its source digest."""
    source_digest = digest(AGENT_SOURCE)
    target, stamp = out / "blixard-agent", out / "blixard-agent.source"
    if target.exists() and stamp.exists() and stamp.read_text().strip() == source_digest:
        return source_digest
    compiler = shutil.which(os.environ.get("CC", "gcc"))
    if compiler is None:
        fail("gcc is not installed (apt-get install gcc libc6-dev)")
    temporary = out / "blixard-agent.tmp"
    result = run(
        [compiler, "-static", "-Os", "-s", "-Wall", "-o", str(temporary), str(AGENT_SOURCE)]
    )
    if result.returncode != 0:
        fail(f"cannot compile the agent:\n{result.stderr.strip()}")
    os.replace(temporary, target)
    stamp.write_text(source_digest + "\n")
    say(f"built the agent ({target.stat().st_size // 1024} KiB)")
    return source_digest


# ---- packages -----------------------------------------------------------------------------


def candidate(package: str) -> str:
    result = run(["apt-cache", "policy", package])
    for line in result.stdout.splitlines():
        line = line.strip()
        if line.startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            return "" if version == "(none)" else version
    return ""


def kernel_package() -> str:
    """linux-image-amd64 is a metapackage: the real kernel is its dependency."""
    result = run(["apt-cache", "depends", KERNEL_META])
    for line in result.stdout.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and line.split()[1].startswith("linux-image-"):
            return line.split()[1]
    return ""


def resolve() -> dict[str, str]:
    """Package -> version for the kernel and busybox, updating apt's lists once if needed."""
    for attempt in range(2):
        kernel = kernel_package()
        versions = {kernel: candidate(kernel)} if kernel else {}
        busybox = candidate(BUSYBOX_PACKAGE)
        if kernel and versions[kernel] and busybox:
            versions[BUSYBOX_PACKAGE] = busybox
            return versions
        if attempt == 0:
            if os.geteuid() != 0:
                fail("apt knows no linux-image-amd64; run `apt-get update` as root once")
            say("apt knows no kernel package yet: apt-get update")
            update = run(["apt-get", "update", "-qq"])
            if update.returncode != 0:
                fail(f"apt-get update failed:\n{update.stderr.strip()}")
    fail(f"apt has no candidate for {KERNEL_META} or {BUSYBOX_PACKAGE}")
    raise AssertionError


def download(packages: dict[str, str], into: Path) -> dict[str, Path]:
    specs = [f"{name}={version}" for name, version in packages.items()]
    result = run(["apt-get", "download", *specs], cwd=into)
    if result.returncode != 0:
        fail(f"apt-get download {' '.join(specs)} failed:\n{result.stderr.strip()}")
    found = {}
    for name in packages:
        debs = sorted(into.glob(f"{name}_*.deb"))
        if not debs:
            fail(f"apt-get download left no {name}_*.deb")
        root = into / f"{name}.root"
        unpack = run(["dpkg-deb", "-x", str(debs[0]), str(root)])
        if unpack.returncode != 0:
            fail(f"cannot unpack {debs[0].name}: {unpack.stderr.strip()}")
        found[name] = root
    return found


# ---- the kernel ---------------------------------------------------------------------------


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage (what scripts/extract-vmlinux does)."""
    for magic, unpack in (
        (b"\xfd7zXZ\x00", lambda data: lzma.LZMADecompressor().decompress(data)),
        (b"\x1f\x8b\x08", lambda data: zlib.decompressobj(31).decompress(data)),
    ):
        start = bzimage.find(magic)
        while start != -1:
            try:
                elf = unpack(bzimage[start:])
            except (lzma.LZMAError, zlib.error):
                elf = b""
            if elf.startswith(b"\x7fELF"):
                return elf
            start = bzimage.find(magic, start + 1)
    fail("no xz or gzip compressed ELF kernel found in the bzImage")
    raise AssertionError


# ---- the initramfs ------------------------------------------------------------------------


class Cpio:
    """A newc cpio archive, written directly (no root needed for /dev/console)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.inode = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)):
        encoded = name.encode() + b"\0"
        fields = [
            self.inode, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
            0, 0, rdev[0], rdev[1], len(encoded), 0,
        ]  # fmt: skip
        self.inode += 1
        header = b"070701" + b"".join(f"{value:08x}".encode() for value in fields)
        self.parts.append(header + encoded + b"\0" * (-(110 + len(encoded)) % 4))
        self.parts.append(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def bytes(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


def build_initramfs(busybox: Path, modules: list[Path], agent: Path) -> bytes:
    archive = Cpio()
    for name in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp",
                 "run", "root", "etc", "lib", "lib/modules"):  # fmt: skip
        archive.directory(name)
    archive.char_device("dev/console", 5, 1)
    archive.char_device("dev/null", 1, 3)
    archive.file("bin/busybox", busybox.read_bytes())
    applets = run([str(busybox), "--list-full"])
    if applets.returncode != 0:
        fail(f"cannot list busybox applets: {applets.stderr.strip()}")
    for path in sorted(set(applets.stdout.split())):
        if path != "bin/busybox" and path.count("/") == 1 + path.startswith("usr/"):
            archive.symlink(path, "/bin/busybox")
    archive.file("init", INIT_SCRIPT.read_bytes())
    archive.file("sbin/blixard-agent", agent.read_bytes())
    for module in modules:
        archive.file(f"lib/modules/{module.name}", module.read_bytes(), 0o644)
    archive.file("etc/hostname", b"blixard-vm\n", 0o644)
    archive.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
    archive.file("etc/group", b"root:x:0:\n", 0o644)
    return archive.bytes()


# ---- the whole image ----------------------------------------------------------------------


def apt_lists_stamp() -> str:
    """Changes when `apt-get update` brings new package lists (so versions may change)."""
    lists = Path("/var/lib/apt/lists")
    stamps = [p.stat().st_mtime_ns for p in lists.glob("*_Packages*")] if lists.is_dir() else []
    return str(max(stamps, default=0))


def load_manifest(path: Path) -> dict[str, object]:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def build_image(out: Path) -> None:
    agent_digest = build_agent(out)
    manifest_path = out / "manifest.json"
    local = {
        "format": FORMAT,
        "agent": agent_digest,
        "init": digest(INIT_SCRIPT),
        "builder": digest(Path(__file__)),
    }
    built = load_manifest(manifest_path)
    complete = all((out / name).exists() for name in ("vmlinux", "initrd.cpio", "blixard-agent"))
    inputs_before = built.get("inputs")
    if (
        complete
        and isinstance(inputs_before, dict)
        and built.get("apt_lists") == apt_lists_stamp()
        and all(inputs_before.get(key) == value for key, value in local.items())
    ):
        say(f"up to date in {out} (kernel {built.get('kernel_release')})")
        return
    try:
        packages = resolve()
    except SystemExit:
        if manifest_path.exists() and (out / "vmlinux").exists():
            say("cannot ask apt for the package versions; keeping the image built before")
            return
        raise
    inputs = {**local, "packages": packages}
    if complete and inputs_before == inputs:
        built["apt_lists"] = apt_lists_stamp()
        manifest_path.write_text(json.dumps(built, indent=2, sort_keys=True) + "\n")
        say(f"up to date in {out} ({', '.join(f'{k} {v}' for k, v in packages.items())})")
        return
    say(f"building from {', '.join(f'{k}={v}' for k, v in packages.items())}")
    with tempfile.TemporaryDirectory(prefix=".build-", dir=out) as work:
        roots = download(packages, Path(work))
        kernel_root = next(root for name, root in roots.items() if name.startswith("linux-"))
        vmlinuz = sorted((kernel_root / "boot").glob("vmlinuz-*"))
        module_dirs = sorted((kernel_root / "lib" / "modules").iterdir())
        if not vmlinuz or not module_dirs:
            fail("the kernel package holds no /boot/vmlinuz-* or /lib/modules/*")
        release = module_dirs[0].name
        modules = [module_dirs[0] / module for module in MODULES]
        missing = [str(m) for m in modules if not m.exists()]
        if missing:
            fail(f"the kernel package lacks {', '.join(missing)}")
        busybox = roots[BUSYBOX_PACKAGE] / "bin" / "busybox"
        vmlinux = extract_vmlinux(vmlinuz[0].read_bytes())
        initrd = build_initramfs(busybox, modules, out / "blixard-agent")
        (out / "vmlinux.tmp").write_bytes(vmlinux)
        (out / "initrd.cpio.tmp").write_bytes(initrd)
        os.replace(out / "vmlinux.tmp", out / "vmlinux")
        os.replace(out / "initrd.cpio.tmp", out / "initrd.cpio")
    manifest = {"inputs": inputs, "kernel_release": release, "apt_lists": apt_lists_stamp()}
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    say(
        f"built {out}/vmlinux ({len(vmlinux) // 2**20} MiB, kernel {release}) and "
        f"initrd.cpio ({len(initrd) // 1024} KiB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("var/vm-image"))
    parser.add_argument("--agent-only", action="store_true", help="only the guest agent")
    args = parser.parse_args()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.agent_only:
        build_agent(out)
        return
    build_image(out)


if __name__ == "__main__":
    main()
