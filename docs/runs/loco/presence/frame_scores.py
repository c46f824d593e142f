"""Frame-level scores (docs/runs/loco/presence/README.md) of a fold's model: presence head p(frame) (when it has one) and the peak of the
mask probability before the gate, on the held-out centre's frames (all hold a polyp) and on
polyp-free-val. Prints AUROC and the share of held-out frames above the score that alarms on at most
5 % / 2 % of polyp-free-val frames. Usage: frame_scores.py MODEL_DIR HELD_OUT_DIR OUT_JSON"""
import json
import sys

import numpy as np
import torch
from scipy.stats import rankdata

from syndiff_stream.model import Segmenter
from syndiff_stream.preprocess import to_model_range
from syndiff_trainer.data import load_dataset
from syndiff_trainer.negatives import load_polyp_free

torch.set_num_threads(1)
model = Segmenter.from_pretrained(sys.argv[1])
size = model.config.image_size


def scores(images):
    pres, peak = [], []
    for i in range(0, len(images), 16):
        x = to_model_range(torch.from_numpy(images[i:i + 16]).permute(0, 3, 1, 2).float())
        with torch.no_grad():
            z_c, z0 = model.single_step(x)
            peak.append(model.decode_latent(z0).amax((1, 2, 3)).numpy())
            if model.presence is not None:
                pres.append(torch.sigmoid(model.presence(z_c, z0)).numpy())
    return (np.concatenate(pres) if pres else None), np.concatenate(peak)


def auroc(pos, neg):
    allv = np.concatenate([pos, neg])
    ranks = rankdata(allv)  # ties share their mean rank: a saturated peak is 1.0 on many frames
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def at_alarm(pos, neg, rate):
    t = np.quantile(neg, 1 - rate, method="higher")
    return float((pos > t).mean()), float(t)


held = load_dataset(sys.argv[2], size)
free = load_polyp_free("../shared/data/polyp-free-val", size)
pp, kp = scores(held.images)
pn, kn = scores(free.images)
out = {"model": sys.argv[1], "held_out": sys.argv[2], "n_pos": len(kp), "n_free": len(kn)}
for name, (pos, neg) in {"presence": (pp, pn), "mask_peak": (kp, kn)}.items():
    if pos is None:
        continue
    out[name] = {"auroc": auroc(pos, neg), "frames_found_at_5pct": at_alarm(pos, neg, 0.05),
                 "frames_found_at_2pct": at_alarm(pos, neg, 0.02),
                 "median_pos": float(np.median(pos)), "median_free": float(np.median(neg))}
if pp is not None:
    joint_pos, joint_neg = pp * kp, pn * kn  # the gated map's peak: what the threshold sees
    out["gated_peak"] = {"auroc": auroc(joint_pos, joint_neg), "frames_found_at_5pct": at_alarm(joint_pos, joint_neg, 0.05),
                         "frames_found_at_2pct": at_alarm(joint_pos, joint_neg, 0.02)}
json.dump(out, open(sys.argv[3], "w"), indent=1)
print(json.dumps(out, indent=1))
