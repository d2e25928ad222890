"""Client-level differential privacy (DP-FedAvg) for every layer-wise method; see docs/privacy.md.

Neutral: it knows states (name -> array) and plain numbers, not strategies.
``settings`` holds the configuration and the combinations refused,
``mechanism`` the clipping and the noised fixed-denominator mean,
``accountant`` the privacy spent (Google's dp-accounting RDP accountant),
``client`` the step a client runs on its reply before the codec encodes it.
"""

from fedlayer.privacy.accountant import PrivacyAccountant
from fedlayer.privacy.settings import CENTRAL, LOCAL, MODES, OFF, Privacy

__all__ = ["CENTRAL", "LOCAL", "MODES", "OFF", "Privacy", "PrivacyAccountant"]
