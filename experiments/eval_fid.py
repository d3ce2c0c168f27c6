"""FID / Inception Score with pytorch-fid's InceptionV3 weights, in JAX.

Usage::

    # once, on a machine with torch: the .pth -> a torch-free .npz
    python -m experiments.eval_fid convert --pth pt_inception-2015-12-05-6726825d.pth --out inception_fid.npz
    # reference statistics of a dataset (pytorch-fid's .npz layout: mu, sigma)
    python -m experiments.eval_fid stats --dataset cifar10 --root data/ --split train \
        --weights inception_fid.npz --out cifar10_train_stats.npz
    # FID + IS of sample shards written by research.eval.fid_sampling.generate_samples
    python -m experiments.eval_fid fid --samples runs/x/samples --ref cifar10_train_stats.npz \
        --weights inception_fid.npz

The weights are pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (download it yourself from
research.eval.inception.FID_WEIGHTS_URL; nothing here downloads). ``fid`` prints one JSON object
(``fid``, ``inception_score``, ``inception_score_std``, ``num_images``, ...). Errors a user can
cause (missing weights / data / stats, bad arguments) end as one ``error:`` line on stderr with
the exit statuses of ``experiments.common.run_cli`` (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import sys

from experiments.common import EXIT_INTERRUPTED, _classify, _one_line


def _stats(args) -> dict:
    from research.data.datasets import load_dataset
    from research.eval.fid import image_statistics, save_statistics
    from research.eval.inception import load_weights

    variables = load_weights(args.weights)  # before the (possibly slow) dataset read
    data = load_dataset(args.dataset, args.root, args.split)
    st = image_statistics(data.images, variables, batch_size=args.batch_size, keep_logits=False,
                          num_images=args.num_images)
    save_statistics(args.out, st.mu, st.sigma)
    out = {"out": args.out, "num_images": st.count, "dataset": args.dataset, "split": args.split}
    print(json.dumps(out))
    return out


def _fid(args) -> dict:
    from research.eval.fid import fid_from_images, load_statistics
    from research.eval.fid_sampling import iter_samples
    from research.eval.inception import load_weights

    variables = load_weights(args.weights)
    ref = load_statistics(args.ref)
    res = fid_from_images(iter_samples(args.samples), ref, variables, batch_size=args.batch_size,
                          splits=args.splits, logits=args.is_logits)
    res.update(samples=args.samples, ref=args.ref)
    print(json.dumps(res))
    return res


def _convert(args) -> dict:
    from research.eval.inception import convert_weights

    out = {"out": convert_weights(args.pth, args.out)}
    print(json.dumps(out))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="FID / Inception Score with pytorch-fid's InceptionV3, in JAX")
    p.add_argument("--debug", action="store_true", help="show tracebacks of expected errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("stats", help="reference mu/sigma of a dataset -> .npz (pytorch-fid layout)")
    s.add_argument("--dataset", required=True, help="a research.data.datasets name: cifar10, mnist, ...")
    s.add_argument("--root", required=True)
    s.add_argument("--split", default="train")
    s.add_argument("--weights", required=True, help="pytorch-fid .pth or converted .npz")
    s.add_argument("--out", required=True)
    s.add_argument("--batch-size", type=int, default=50)
    s.add_argument("--num-images", type=int, default=None, help="use only the first N images")
    s.set_defaults(fn=_stats)

    f = sub.add_parser("fid", help="FID and IS of a sample-shard directory against reference stats")
    f.add_argument("--samples", required=True, help="directory of samples_XXXXXX.npz shards")
    f.add_argument("--ref", required=True, help="reference stats .npz (ours or pytorch-fid's)")
    f.add_argument("--weights", required=True)
    f.add_argument("--batch-size", type=int, default=50)
    f.add_argument("--splits", type=int, default=10, help="Inception Score splits")
    f.add_argument("--is-logits", choices=("logits_unbiased", "logits"), default="logits_unbiased",
                   help="logits_unbiased = pool3 @ W as the original TF IS code; logits adds the fc bias")
    f.set_defaults(fn=_fid)

    c = sub.add_parser("convert", help="pytorch-fid .pth -> .npz (no torch needed afterwards)")
    c.add_argument("--pth", required=True)
    c.add_argument("--out", required=True)
    c.set_defaults(fn=_convert)
    return p


def main(argv=None):
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as e:  # noqa: BLE001 - classified as run_cli does; bugs keep their traceback
        code = _classify(e)
        if args.debug or code is None:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(code) from None


if __name__ == "__main__":
    main()
