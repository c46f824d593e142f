"""Fit presence classifiers on pooled frozen features (pooled_feats.py) and score held-out frames
against polyp-free-val. Usage: FEATS.npz"""
import sys, numpy as np, torch
from scipy.stats import rankdata
torch.set_num_threads(1)
d = np.load(sys.argv[1])
dims = d["dims"]; names = ["enc", "zc", "unet", "z0", "area"]
edges = np.concatenate([[0], np.cumsum(dims)])
def cols(groups):
    return np.concatenate([np.arange(edges[names.index(g)], edges[names.index(g) + 1]) for g in groups])
def auroc(p, n):
    r = rankdata(np.concatenate([p, n])); return float((r[:len(p)].sum() - len(p) * (len(p) + 1) / 2) / (len(p) * len(n)))
def fit(groups, hidden=0, wd=1e-3, epochs=300, seed=0):
    c = cols(groups)
    X = np.concatenate([d["pos"][:, c], d["neg"][:, c]]); y = np.r_[np.ones(len(d["pos"])), np.zeros(len(d["neg"]))]
    mu, sd = X.mean(0), X.std(0) + 1e-6
    f = lambda a: torch.tensor((a[:, c] - mu) / sd, dtype=torch.float32)
    torch.manual_seed(seed)
    net = torch.nn.Linear(len(c), 1) if not hidden else torch.nn.Sequential(
        torch.nn.Linear(len(c), hidden), torch.nn.SiLU(), torch.nn.Dropout(0.2), torch.nn.Linear(hidden, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2 if not hidden else 3e-3, weight_decay=wd)
    Xt = torch.tensor((X - mu) / sd, dtype=torch.float32); yt = torch.tensor(y, dtype=torch.float32)
    for _ in range(epochs):
        net.train(); loss = torch.nn.functional.binary_cross_entropy_with_logits(net(Xt)[:, 0], yt)
        opt.zero_grad(); loss.backward(); opt.step()
    net.eval()
    with torch.no_grad():
        sh, sf = net(f(d["held"]))[:, 0].numpy(), net(f(d["free"]))[:, 0].numpy()
        train_acc = float(((net(Xt)[:, 0] > 0).float() == yt).float().mean())
    t5, t2 = np.quantile(sf, .95, method="higher"), np.quantile(sf, .98, method="higher")
    return {"auroc": round(auroc(sh, sf), 3), "found@5%": round(float((sh > t5).mean()), 3),
            "found@2%": round(float((sh > t2).mean()), 3), "train_acc": round(train_acc, 3)}
for groups in (["area"], ["z0"], ["zc"], ["enc"], ["unet"], ["zc", "z0"], ["enc", "unet"], ["enc", "zc", "unet", "z0", "area"]):
    print("+".join(groups), "linear", fit(groups), "mlp64", fit(groups, hidden=64, wd=1e-2))
