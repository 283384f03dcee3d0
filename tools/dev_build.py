"""Incremental development build of a subset of the native ops, isolated from other builds.

  python tools/dev_build.py --name mine --ops tree verify_greedy [--cuda]
  export KANGAROO_KERNELS_C_PATH=<printed path>   # kangaroo_kernels then loads that library

Compiles csrc/registration.cpp + csrc/cpu/<op>.cpp (+ csrc/<op>.cu and csrc/<op>_cuda.cpp with --cuda)
into /tmp/kangaroo_dev_<name>. The release build is `pip install --no-build-isolation -e .` (setup.py).
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--ops", nargs="+", required=True)
    ap.add_argument("--cuda", action="store_true")
    args = ap.parse_args()
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils import cpp_extension

    srcs = [os.path.join(ROOT, "csrc", "registration.cpp")]
    for op in args.ops:
        srcs.append(os.path.join(ROOT, "csrc", "cpu", f"{op}.cpp"))
        if args.cuda:
            srcs += [os.path.join(ROOT, "csrc", f"{op}.cu"), os.path.join(ROOT, "csrc", f"{op}_cuda.cpp")]
    srcs = [s for s in srcs if os.path.exists(s)]
    bdir = f"/tmp/kangaroo_dev_{args.name}"
    os.makedirs(bdir, exist_ok=True)
    flags = ["-O2", "-DKANGAROO_WITH_CUDA=1"] if args.cuda else ["-O2"]
    extra_ldflags = []
    if args.cuda:
        import site

        for sp in site.getsitepackages():
            lib = os.path.join(sp, "nvidia", "cu13", "lib")
            if os.path.isdir(lib):
                extra_ldflags.append(f"-L{lib}")
    cpp_extension.load(
        name=f"kangaroo_dev_{args.name}", sources=srcs, build_directory=bdir, is_python_module=False,
        extra_include_paths=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")],
        extra_cflags=flags, extra_cuda_cflags=flags + ["--expt-relaxed-constexpr"],
        extra_ldflags=extra_ldflags, with_cuda=args.cuda, verbose=False,
    )
    print(os.path.join(bdir, f"kangaroo_dev_{args.name}.so"))


if __name__ == "__main__":
    main()
