#!/usr/bin/env python
"""Sort a flat ILSVRC2012 validation folder into class folders: val/<wnid>/<image>.

resnet-train (like torchvision's ImageFolder) reads root/val/<class>/*; the official
validation archive unpacks as 50,000 images in one folder. The labels come from one of:

  --devkit DIR          ILSVRC2012_devkit_t12: data/ILSVRC2012_validation_ground_truth.txt
                        (the ILSVRC2012_ID of each image, in file-name order) and
                        data/meta.mat (ID -> wnid; needs scipy), or a synsets.txt in DIR
  --ground-truth FILE --synsets FILE
                        the same ground truth, plus the wnids one per line in ILSVRC2012_ID
                        order (line k = ID k; extra words after the wnid are ignored).
                        Note: LOC_synset_mapping.txt is sorted by wnid, which is NOT the
                        devkit's ID order; use it only with IDs in that order.
  --csv FILE            rows "filename,class" (a header row is skipped; the class is the
                        first word of the second column, so Kaggle's LOC_val_solution.csv
                        works as it is; file names may omit the extension)

Dry run by default: prints what it would do. --apply moves the files (a rename within the
folder). Safe to re-run: images already in their class folder are left alone, nothing is
moved twice and nothing is overwritten.

Exit status: 0 done (or nothing to do), 2 bad arguments or unreadable label files.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class UsageError(Exception):
    pass


def read_ground_truth(path: str) -> list[int]:
    """ILSVRC2012_IDs (1-based) of ILSVRC2012_val_00000001.JPEG, ...00000002.JPEG, ..."""
    try:
        with open(path) as fh:
            return [int(line.split()[0]) for line in fh if line.strip()]
    except (OSError, ValueError, IndexError) as e:
        raise UsageError(f"{path}: cannot read the ground truth ({e})") from None


def read_synsets(path: str) -> list[str]:
    """wnids, one per line (the first word), line k = ILSVRC2012_ID k."""
    try:
        with open(path) as fh:
            wnids = [line.split()[0] for line in fh if line.strip()]
    except OSError as e:
        raise UsageError(f"{path}: cannot read the synsets ({e})") from None
    if len(wnids) >= 1000 and wnids[:1000] == sorted(wnids[:1000]):
        print(f"warning: {path} is sorted by wnid; the devkit's ILSVRC2012_IDs are in another "
              f"order (ID 1 is n02119789). Check the result, or use meta.mat.", file=sys.stderr)
    return wnids


def read_meta_mat(path: str) -> list[str]:
    """wnids in ILSVRC2012_ID order from the devkit's meta.mat (the 1000 leaf synsets)."""
    try:
        from scipy import io as sio
    except ImportError:
        raise UsageError(f"{path}: reading meta.mat needs scipy (pip install scipy), or pass "
                         f"--synsets with the wnids in ILSVRC2012_ID order") from None
    try:
        synsets = sio.loadmat(path, squeeze_me=True)["synsets"]
    except Exception as e:  # noqa: BLE001 - any failure: a bad devkit file
        raise UsageError(f"{path}: cannot read meta.mat ({e})") from None
    leaves = [s for s in synsets if int(s[4]) == 0]  # (ID, WNID, words, gloss, num_children..)
    by_id = {int(s[0]): str(s[1]) for s in leaves}
    return [by_id[i] for i in sorted(by_id)]


def mapping_from_ids(ids: list[int], wnids: list[str]) -> dict[str, str]:
    out = {}
    for k, i in enumerate(ids, start=1):
        if not 1 <= i <= len(wnids):
            raise UsageError(f"ground truth line {k}: ILSVRC2012_ID {i} is not in 1..{len(wnids)}")
        out[f"ILSVRC2012_val_{k:08d}.JPEG"] = wnids[i - 1]
    return out


def mapping_from_csv(path: str) -> dict[str, str]:
    out = {}
    try:
        with open(path, newline="") as fh:
            for n, row in enumerate(csv.reader(fh)):
                if len(row) < 2 or not row[1].strip():
                    continue
                name, cls = row[0].strip(), row[1].split()[0]
                if n == 0 and name.lower() in ("filename", "file", "imageid", "image", "name"):
                    continue  # header
                out[name] = cls
    except OSError as e:
        raise UsageError(f"{path}: cannot read the CSV ({e})") from None
    if not out:
        raise UsageError(f"{path}: no 'filename,class' rows")
    return out


def load_mapping(args) -> dict[str, str]:
    if args.csv:
        return mapping_from_csv(args.csv)
    if args.devkit:
        data = os.path.join(args.devkit, "data")
        gt = os.path.join(data, "ILSVRC2012_validation_ground_truth.txt")
        ids = read_ground_truth(gt)
        for cand in (os.path.join(args.devkit, "synsets.txt"), os.path.join(data, "synsets.txt")):
            if os.path.isfile(cand):
                return mapping_from_ids(ids, read_synsets(cand))
        return mapping_from_ids(ids, read_meta_mat(os.path.join(data, "meta.mat")))
    if args.ground_truth and args.synsets:
        return mapping_from_ids(read_ground_truth(args.ground_truth), read_synsets(args.synsets))
    raise UsageError("give --devkit DIR, --ground-truth FILE with --synsets FILE, or --csv FILE")


def plan(val_dir: str, mapping: dict[str, str]):
    """(moves [(src, dst)], already sorted, conflicts, missing, unlisted) for val_dir."""
    flat = {e.name for e in os.scandir(val_dir) if e.is_file()}
    by_stem = {os.path.splitext(n)[0]: n for n in flat}
    listings: dict[str, dict[str, str]] = {}  # class folder -> {stem: name}

    def in_folder(cls: str, stem: str) -> str | None:
        if cls not in listings:
            d = os.path.join(val_dir, cls)
            names = os.listdir(d) if os.path.isdir(d) else []
            listings[cls] = {os.path.splitext(n)[0]: n for n in names}
        return listings[cls].get(stem)

    moves, done, conflicts, missing, listed = [], 0, [], [], set()
    for name, cls in sorted(mapping.items()):
        fname = name
        if not os.path.splitext(name)[1]:  # a CSV id without the extension
            fname = by_stem.get(name) or in_folder(cls, name) or name
        listed.add(fname)
        src, dst = os.path.join(val_dir, fname), os.path.join(val_dir, cls, fname)
        if os.path.isfile(dst):
            if fname in flat:
                conflicts.append(src)  # in both places: never overwrite, leave it to the user
            else:
                done += 1
        elif fname in flat:
            moves.append((src, dst))
        else:
            missing.append(fname)
    unlisted = sorted(n for n in flat - listed if n.lower().endswith(IMG_EXTENSIONS))
    return moves, done, conflicts, missing, unlisted


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("val_dir", help="the flat validation folder (becomes val/<wnid>/...)")
    p.add_argument("--devkit", help="ILSVRC2012_devkit_t12 directory")
    p.add_argument("--ground-truth", help="ILSVRC2012_validation_ground_truth.txt")
    p.add_argument("--synsets", help="wnids one per line in ILSVRC2012_ID order")
    p.add_argument("--csv", help="filename,class rows")
    p.add_argument("--apply", action="store_true", help="move the files (default: dry run)")
    args = p.parse_args(argv)
    try:
        if not os.path.isdir(args.val_dir):
            raise UsageError(f"{args.val_dir}: directory not found")
        mapping = load_mapping(args)
        moves, done, conflicts, missing, unlisted = plan(args.val_dir, mapping)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    classes = len({os.path.dirname(d) for _, d in moves})
    verb = "moved" if args.apply else "would move"
    if args.apply:
        for src, dst in moves:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.exists(dst):  # appeared meanwhile: never overwrite
                conflicts.append(src)
                continue
            os.rename(src, dst)
    print(f"{verb} {len(moves)} images into {classes} class folders; "
          f"{done} already in place; {len(mapping)} labels")
    for what, items in (("in both the flat folder and its class folder (left alone)", conflicts),
                        ("listed but not found", missing),
                        ("images not in the labels (left alone)", unlisted)):
        if items:
            print(f"{len(items)} {what}: {', '.join(map(str, items[:5]))}"
                  f"{' ...' if len(items) > 5 else ''}")
    if moves and not args.apply:
        print("dry run: nothing moved; add --apply to move the files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
