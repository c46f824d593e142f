"""Presence on a frozen segmenter: does a head trained afterwards, on the frozen model's (z_c, z0~)
for two centres' frames (+ decoys) against their polyp-free crops and erased frames, tell the third
centre's frames from polyp-free-val? Usage: MODEL TRAIN_DIR[,TRAIN_DIR] HELD_OUT_DIR OUT.json [AUGS]"""
import json, sys, time
import numpy as np, torch
from scipy.stats import rankdata
from syndiff_stream.model import Segmenter, PresenceHead
from syndiff_stream.preprocess import to_model_range
from syndiff_trainer.data import load_dataset, build_augmenter
from syndiff_trainer.negatives import load_crops, load_polyp_free, erase_polyps
torch.set_num_threads(1)
torch.manual_seed(0)
m = Segmenter.from_pretrained(sys.argv[1]).eval()
S = m.config.image_size
train_dirs, held_dir, out_path = sys.argv[2].split(","), sys.argv[3], sys.argv[4]
augs = int(sys.argv[5]) if len(sys.argv) > 5 else 1

@torch.no_grad()
def feats(images):
    zc, z0 = [], []
    for i in range(0, len(images), 32):
        x = to_model_range(torch.from_numpy(np.ascontiguousarray(images[i:i + 32])).permute(0, 3, 1, 2).float())
        a, b = m.single_step(x)
        zc.append(a.half()); z0.append(b.half())
    return torch.cat(zc), torch.cat(z0)

def augmented(images, masks, seed):
    aug = build_augmenter("scope", seed=seed)
    out = [aug(image=im, mask=mk.astype(np.uint8))["image"] for im, mk in zip(images, masks)]
    return np.stack(out)

t0 = time.time()
pos_img, neg_img = [], []
for d in train_dirs:
    ds = load_dataset(d, S, progress=False)
    crops = load_crops(d, S, per_image=1, progress=False)
    erased, decoys = erase_polyps(ds)
    pos_img += [ds.images, decoys.images]
    neg_img += [crops.images, erased.images]
    for k in range(1, augs):
        pos_img.append(augmented(ds.images, ds.masks, k))
        neg_img.append(augmented(crops.images, crops.masks, 100 + k))
pos = feats(np.concatenate(pos_img)); neg = feats(np.concatenate(neg_img))
held = feats(load_dataset(held_dir, S, progress=False).images)
free = feats(load_polyp_free("../shared/data/polyp-free-val", S).images)
print(f"features: {len(pos[0])} pos, {len(neg[0])} neg, {len(held[0])} held, {len(free[0])} free in {time.time()-t0:.0f} s", flush=True)

def auroc(p, n):
    r = rankdata(np.concatenate([p, n]))
    return float((r[:len(p)].sum() - len(p) * (len(p) + 1) / 2) / (len(p) * len(n)))

def report(score_held, score_free, name):
    t5 = np.quantile(score_free, 0.95, method="higher"); t2 = np.quantile(score_free, 0.98, method="higher")
    r = {"auroc": auroc(score_held, score_free), "found_at_5pct": float((score_held > t5).mean()),
         "found_at_2pct": float((score_held > t2).mean())}
    print(name, {k: round(v, 3) for k, v in r.items()}, flush=True)
    return r

results = {}
# 1. the model's own head, if it has one
if m.presence is not None:
    with torch.no_grad():
        results["joint_head"] = report(m.presence(*[t.float() for t in held]).numpy(), m.presence(*[t.float() for t in free]).numpy(), "joint head")
# 2. a fresh PresenceHead on the frozen features
zc = torch.cat([pos[0], neg[0]]).float(); z0 = torch.cat([pos[1], neg[1]]).float()
y = torch.cat([torch.ones(len(pos[0])), torch.zeros(len(neg[0]))])
for seed in (0, 1):
    torch.manual_seed(seed)
    head = PresenceHead(m.config)
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3, weight_decay=0.01)
    w = torch.tensor(len(neg[0]) / len(pos[0]))
    for epoch in range(30):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            j = perm[i:i + 64]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(head(zc[j], z0[j]), y[j], pos_weight=w)
            opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        results[f"frozen_head_seed{seed}"] = report(head(*[t.float() for t in held]).numpy(), head(*[t.float() for t in free]).numpy(), f"frozen head seed {seed}")
# 3. the mask alone: area of the predicted mask
with torch.no_grad():
    area = lambda f: (m.decode_latent(f[1].float()) > 0.5).float().mean((1, 2, 3)).numpy()
    results["mask_area"] = report(area(held), area(free), "mask area")
json.dump(results, open(out_path, "w"), indent=1)
