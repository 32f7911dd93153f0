"""The original project's PyTorch optimizer, the oracle of the PyTorch front
end: ``expectigrad.pytorch.Expectigrad`` itself where the original package
is installed (the ``test`` extra installs it), else ``Transcription``, its
arithmetic transcribed from its source (expectigrad/pytorch/expectigrad.py):
a running sum and a float counter per parameter, ten tensor operations a
step, momentum and counter fixed by the constructor's beta and
sparse_counter for every group."""
import torch


class Transcription(torch.optim.Optimizer):
    def __init__(self, params, lr=0.001, beta=0.9, eps=1e-8, sparse_counter=True):
        super().__init__(params, dict(lr=lr, beta=beta, eps=eps, sparse_counter=sparse_counter))
        self.use_momentum = beta > 0.0
        self.sparse_counter = sparse_counter

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["sum"] = torch.zeros_like(p)
                    if self.sparse_counter:
                        st["counter"] = torch.zeros_like(p)
                    if self.use_momentum:
                        st["momentum"] = torch.zeros_like(p)
                st["step"] += 1
                t = st["step"]
                sq = g.square()
                st["sum"].add_(sq)
                if self.sparse_counter:
                    st["counter"].add_(sq.sign())
                    n = st["counter"]
                else:
                    n = t
                avg = st["sum"].div(n)
                avg[torch.isnan(avg)] = 0.0               # 0/0 := 0
                u = g.div(avg.sqrt_().add_(group["eps"]))
                lr = group["lr"]
                if self.use_momentum:
                    beta = group["beta"]
                    m = st["momentum"].mul_(beta).add_(u.mul(1.0 - beta))
                    lr = lr / (1.0 - beta ** t)
                else:
                    m = u
                p.add_(m.mul(-lr))
        return loss


try:
    from expectigrad.pytorch import Expectigrad as OriginalExpectigrad
except ImportError:                                   # the original is not installed
    OriginalExpectigrad = Transcription
