"""A Kvasir validation subset clean for BOTH models: in the new run's grouped val, in compact-kvasir's
88 held-out images, and in no near-copy group that compact-kvasir trained on. Written as a split file
(everything else named 'train', so eval scores only these) plus the ClinicDB held-out sequences."""
import json, sys
from pathlib import Path
from syndiff_trainer.data import load_dataset, group_ids
new = json.load(open(sys.argv[1]))
old = json.load(open("syndiff_stream/weights/compact-kvasir/split.json"))
root = Path("../shared/data/kvasir-seg-train")
ds = load_dataset(root, 256, progress=False)
groups = dict(zip(ds.stems, group_ids(ds, "phash", root, 5)))
old_train_groups = {groups[s] for s in old["train"]}
new_val = {s.split("/", 1)[1] for s in new["val"] if s.startswith("kvasir/")}
clean = sorted(s for s in new_val & set(old["val"]) if groups[s] not in old_train_groups)
dropped = sorted(s for s in new_val & set(old["val"]) if groups[s] in old_train_groups)
print(f"kvasir: new val {len(new_val)}, also in old val {len(new_val & set(old['val']))}, clean for both {len(clean)} (near-copy of old training: {len(dropped)})")
val = [f"kvasir/{s}" for s in clean] + [s for s in new["val"] if s.startswith("clinicdb/")]
everything = [f"kvasir/{s}" for s in ds.stems] + [s for side in ("train", "val") for s in new[side] if s.startswith("clinicdb/")]
json.dump({"train": sorted(set(everything) - set(val)), "val": val}, open(sys.argv[2], "w"), indent=1)
print("val", len(val))
