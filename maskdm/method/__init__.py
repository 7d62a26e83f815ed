"""The method: pruners (magnitude, random, Taylor, Wanda, SparseGPT; N:M and unstructured, layer and
global scope) and MaskPro-style mask learning (mask distributions, the policy-gradient loop, the
replayed minibatches it is scored on). Built on :mod:`maskdm.masks` and :mod:`maskdm.ddpm`."""
