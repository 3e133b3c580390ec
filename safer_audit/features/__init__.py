"""The features stage: salience, the selected features, their cards and labels."""
